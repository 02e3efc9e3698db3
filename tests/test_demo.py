"""The web demo: checkpoint loading, the session it drives, and the page in headless Chromium."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from clirun import ROOT, SMOKE_CKPT

import demo
from datamodules.procgen import ProcgenConfig, ProcgenVectorEnv, vector_env
from dreamer.agent import Dreamer

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("DREAMER_CHROMIUM", "/usr/bin/chromium")
# flags for a closed network: without the background-networking ones Chromium keeps dialling out
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def checkpoint(smoke_run):
    cwd, _ = smoke_run
    return cwd / SMOKE_CKPT


def test_load_agent_restores_the_trained_weights_and_run_setup(checkpoint):
    loaded = demo.load_agent(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in loaded.agent.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert loaded.game == "coinrun" and loaded.levels.num_levels == 10
    assert not loaded.dreams_on and not loaded.agent.training


def test_load_agent_refuses_bad_files_with_what_is_wrong(tmp_path, checkpoint):
    with pytest.raises(demo.DemoError, match="no checkpoint at"):
        demo.load_agent(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(demo.DemoError, match="cannot|refused it"):
        demo.load_agent(corrupt)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(demo.DemoError, match="not a Dreamer checkpoint"):
        demo.load_agent(other)
    wrong = tmp_path / "wrong_size.ckpt"
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = Dreamer(size="small").state_dict()
    torch.save(ckpt, wrong)
    with pytest.raises(demo.DemoError, match="does not hold a Dreamer this code can restore"):
        demo.load_agent(wrong)
    # the command line says the same, without a traceback
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(corrupt)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_a_goal_dreamer_shows_its_active_goal_decoded(checkpoint, tmp_path):
    from dreamer.goals import GoalDreamer

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    agent = GoalDreamer(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    agent.load_state_dict(ckpt["state_dict"], strict=False)  # the trained weights, fresh goal modules
    ckpt["state_dict"], ckpt["dreamer"]["agent_class"] = agent.state_dict(), "dreamer.goals.agent.GoalDreamer"
    torch.save(ckpt, tmp_path / "goals.ckpt")
    loaded = demo.load_agent(tmp_path / "goals.ckpt")
    assert isinstance(loaded.agent, GoalDreamer)
    session = demo.DemoSession(loaded)
    session.start("coinrun", "unseen", 2, show_goals=True)
    session.step()
    image, text = session.goal()
    assert image.shape == (256, 256, 3) and re.search(r"goal similarity -?\d\.\d{3}", text)
    assert len(session.similarities) == 2


def test_levels_map_to_the_runs_training_and_unseen_level_seeds(checkpoint):
    levels = demo.load_agent(checkpoint).levels  # 10 training levels from 0
    assert [demo.level_seed(levels, "training", i) for i in (0, 9, 10)] == [0, 9, 0]
    assert demo.level_seed(levels, "unseen", 0) == 10 and demo.level_seed(levels, "unseen", 5) == 15
    with pytest.raises(demo.DemoError, match="levels must be one of training, unseen"):
        demo.level_seed(levels, "test", 0)
    explore = ProcgenConfig(game="maze", num_envs=1, distribution_mode="exploration", num_levels=0)
    session = demo.DemoSession(dataclasses.replace(demo.load_agent(checkpoint), levels=explore))
    session.start("maze", "unseen", 7, show_goals=False)  # exploration's unseen: hard mode, any level
    assert (session.seed, session.env.distribution_mode) == (7, "hard")
    session.start("maze", "training", 7, show_goals=False)
    assert session.env.distribution_mode == "exploration"


def test_session_shows_procgens_frames_and_the_agents_dreams(checkpoint):
    session = demo.DemoSession(demo.load_agent(checkpoint))
    session.start("coinrun", "unseen", 2, show_goals=True)
    twin = ProcgenVectorEnv("coinrun", 1, "easy", num_levels=1, start_level=12, seed=12)
    obs, _ = twin.reset()
    assert np.array_equal(session.obs, obs), "the shown frame is procgen's own frame of level 12"
    for _ in range(5):
        action = session.action.copy()
        session.step()
        obs, reward, *_ = twin.step(action)
        assert np.array_equal(session.obs, obs)
    twin.close()
    assert len(session.values) == 6 and len(session.rewards) == 5
    assert session.frame().shape == (256, 256, 3)
    assert session.filmstrip().shape[1] >= demo.DREAM_STEPS * 128
    image, text = session.goal()
    assert image is None and "plain DreamerV3" in text  # the smoke run trained no goal framework
    assert "unseen level 2 (level seed 12), step 5" in session.summary()
    session.start("bigfish", "training", 0, show_goals=False)
    assert session.goal()[0] is None and "trained on coinrun" in session.summary()
    session.start("sanity-colour", "unseen", 3, show_goals=False)  # a sanity task's level 13
    twin = vector_env("sanity-colour", 1, "easy", num_levels=1, start_level=13, seed=13)
    assert np.array_equal(session.obs, twin.reset()[0])
    with pytest.raises(demo.DemoError, match="unknown game"):
        session.start("pong", "training", 0, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IDLE = ("() => document.querySelectorAll('.pending, .eta-bar, .progress-text').length === 0"
        " && [...document.querySelectorAll('img')].every(i => i.complete)")


def test_demo_in_headless_chromium_loads_a_checkpoint_and_steps(checkpoint):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `python3 run.py test` installs Debian's chromium; "
                    "or set DREAMER_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py"), "--port", str(port)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    log = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = server.stdout.readline()
            log.append(line)
            if "Running on local URL" in line or server.poll() is not None:
                break
        assert f"http://127.0.0.1:{port}" in "".join(log), "".join(log)
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#ckpt textarea, #ckpt input").first.fill(str(checkpoint))
            page.locator("#load").click()
            page.locator("#status").get_by_text("tiny model").wait_for(timeout=60_000)
            page.locator("#info").get_by_text("step 0,").wait_for(timeout=30_000)
            page.wait_for_function(IDLE, timeout=30_000)
            first = page.locator("#real-frame img").screenshot()
            assert page.locator("#filmstrip img").count() == 1 and page.locator("#value img").count() == 1
            changed = False
            for step in range(1, 16):  # an idle agent can leave a frame unchanged for a step
                page.locator("#step").click()
                page.locator("#info").get_by_text(f"step {step},").wait_for(timeout=30_000)
                page.wait_for_function(IDLE, timeout=30_000)
                if page.locator("#real-frame img").screenshot() != first:
                    changed = True
                    break
            page.screenshot(path=str(ARTIFACTS / "demo_step.png"), full_page=True)
            assert changed, "the real frame did not change over 15 steps"
            page.locator("#auto label, #auto input").first.click()  # auto-play advances by itself
            page.locator("#info").get_by_text(re.compile(rf"step ({step + 3}|{step + 4}|{step + 5}),")).wait_for(timeout=30_000)
            page.locator("#ckpt textarea, #ckpt input").first.fill(str(checkpoint) + ".missing")
            page.locator("#load").click()
            page.locator("#status").get_by_text("no checkpoint at").wait_for(timeout=30_000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "public URL" not in "".join(log), "no public link unless --share"
    assert (ARTIFACTS / "demo_step.png").stat().st_size > 10_000

