"""benchmarks/sanity_learning.py: its arithmetic by hand, and one tiny run through the real CLI
whose record a second call reads back instead of training again."""

import json
import subprocess
import sys

import numpy as np

from benchmarks import sanity_learning as bench
from clirun import ROOT

DATA = {"batch_size": 16, "seq_len": 64, "train_ratio": 64, "learning_starts": 1024}


def test_env_steps_map_to_the_updates_the_train_ratio_allowed():
    # one update per 16 env steps after 1,024 random ones
    np.testing.assert_array_equal(bench.updates_at(np.array([0, 1024, 1039, 1040, 33024]), DATA), [0, 0, 0, 1, 2000])


def test_return_curve_is_the_moving_mean_of_the_latest_16_episodes(tmp_path):
    csv = tmp_path / "episodes.csv"
    rows = [(1024 + 1024 * (i // 16), float(i)) for i in range(40)]  # 16 episodes end together
    csv.write_text("env_steps,return,length,level_complete,level_seed\n"
                   + "".join(f"{s},{r},64,0.0,1\n" for s, r in rows))
    x, mean = bench.return_curve(csv, DATA)
    assert len(x) == 40 - 15 and mean[0] == np.mean(range(16)) and mean[-1] == np.mean(range(24, 40))
    assert x[0] == 0 and x[-1] == (3072 - 1024) // 16
    assert bench.first_reach(x, mean, lambda r: r >= 20.0) == x[np.flatnonzero(mean >= 20)[0]]
    assert bench.first_reach(x, mean, lambda r: r >= 100) is None


def test_summary_reports_seeds_that_never_reached_the_target():
    assert bench.summary([None, None], 2000) == "0 of 2 seeds; 2 never within 2000"
    text = bench.summary([300, None, 500], 2000)
    assert text.startswith("    400 +-   100  (2 of 3 seeds; 300, 500); 1 never within 2000")


def test_a_tiny_run_writes_its_record_and_a_second_call_reads_it_back(tmp_path):
    tiny = ["--model.size", "tiny", "--data.num_envs", "4", "--data.test_num_envs", "4", "--data.batch_size", "2",
            "--data.seq_len", "8", "--data.train_ratio", "4", "--data.learning_starts", "64",
            "--data.val_episodes", "4", "--dream_pictures.enabled", "false"]
    cmd = [sys.executable, "benchmarks/sanity_learning.py", "--tasks", "sanity-grid", "--sizes", "tiny", "--seeds", "3",
           "--updates", "20", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--", *tiny]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "sanity-grid-tiny-seed3.json").read_text())
    assert record["updates"] == 20 and record["extra"] == tiny and record["random"] == -0.13
    assert record["entropy_curve"] and record["entropy_curve"][-1][0] <= 20
    assert "sanity-grid    tiny  target 5000: return" in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[sanity-grid-tiny-seed3]" not in again.stdout  # nothing trained again
    bad = subprocess.run([*cmd[:2], "--tasks", "sanity-grid", "oops"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'oops'" in bad.stderr
