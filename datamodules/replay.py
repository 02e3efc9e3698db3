"""Sequence replay: uint8 frames and per-step scalars in preallocated rings, in RAM or on disk.

Storage is split into one lane per environment; each lane is a ring written in time order, so a
sequence is a run of consecutive slots of one lane. Per step the replay keeps the frame, the
action taken from it, the reward received on arriving at it, and the flags is_first, is_last and
is_terminal (12,288 + 6 bytes for a 64x64x3 frame).

With ``latents`` it also keeps, per step, the world model's latent state there (DreamerV3's replay
context): ``deter`` in float16 and the ``stoch`` sample as class indices, written back by training
(``store_latents``) and read as the starting state of later sequences (``deter * 2 + stoch``
bytes more per step). A step's latent is marked valid until the slot is overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamer.compat import release_memmap_pages

FIRST, LAST, TERMINAL, LATENT = 1, 2, 4, 8
FIELDS = ("frames", "action", "reward", "flags")  # stored per step (latents besides, optionally)
_META = "meta.json"


class SequenceReplay:
    """Uniform replay of fixed-length sequences over ``num_lanes`` rings of ``capacity // num_lanes`` steps.

    ``storage="ram"`` keeps numpy arrays in memory; ``storage="memmap"`` keeps memory-mapped files in
    ``directory`` (reopened when it already holds a replay of the same shape) and returns their pages
    to the OS as it goes, so resident memory stays small whatever the capacity.

    A sequence never contains an unwritten slot nor crosses a lane's write head; it may cross
    episode boundaries, which ``is_first`` marks. Sampling is uniform over all valid start slots.
    """

    def __init__(
        self,
        capacity: int,
        num_lanes: int,
        obs_shape: tuple[int, ...] = (64, 64, 3),
        storage: str = "ram",
        directory: str | os.PathLike | None = None,
        seed: int | None = None,
        release_every_bytes: int = 64 << 20,
        latents: dict[str, int] | None = None,
    ) -> None:
        if storage not in ("ram", "memmap"):
            raise ValueError(f"replay storage must be 'ram' or 'memmap', got {storage!r}")
        if num_lanes < 1 or capacity < num_lanes:
            raise ValueError(
                f"replay capacity ({capacity}) must be at least the number of lanes ({num_lanes}) "
                "and the number of lanes at least 1"
            )
        if storage == "memmap" and directory is None:
            raise ValueError("memmap replay needs a directory for its files")
        self.num_lanes = int(num_lanes)
        self.lane_capacity = int(capacity) // self.num_lanes
        self.capacity = self.lane_capacity * self.num_lanes
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.storage = storage
        self.latents = {k: int(v) for k, v in latents.items()} if latents else None
        if self.latents is not None and set(self.latents) != {"deter", "stoch"}:
            raise ValueError(f"replay latents need sizes for 'deter' and 'stoch', got {sorted(self.latents)}")
        self.directory = Path(directory) if directory is not None else None
        self.rng = np.random.default_rng(seed)
        self._release_every = release_every_bytes
        self._touched = 0
        self._all_lanes = np.arange(self.num_lanes)
        self._frame_bytes = int(np.prod(self.obs_shape))

        shapes = {
            "frames": ((self.num_lanes, self.lane_capacity, *self.obs_shape), np.uint8),
            "action": ((self.num_lanes, self.lane_capacity), np.uint8),
            "reward": ((self.num_lanes, self.lane_capacity), np.float32),
            "flags": ((self.num_lanes, self.lane_capacity), np.uint8),
        }
        if self.latents is not None:
            shapes["deter"] = ((self.num_lanes, self.lane_capacity, self.latents["deter"]), np.float16)
            shapes["stoch"] = ((self.num_lanes, self.lane_capacity, self.latents["stoch"]), np.uint8)
        if storage == "ram":
            self.data = {k: np.zeros(s, d) for k, (s, d) in shapes.items()}
            self.count = np.zeros(self.num_lanes, np.int64)
        else:
            self.data, self.count = self._open_files(shapes)
        # Valid slots of each lane, ending at its head (count % lane_capacity).
        self.size = np.minimum(self.count, self.lane_capacity)

    # ---------------------------------------------------------------- files
    def _meta(self) -> dict[str, Any]:
        meta = {
            "num_lanes": self.num_lanes,
            "lane_capacity": self.lane_capacity,
            "obs_shape": list(self.obs_shape),
        }
        if self.latents is not None:
            meta["latents"] = self.latents
        return meta

    def _open_files(self, shapes):
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / _META
        exists = meta_path.exists()
        if exists:
            found = json.loads(meta_path.read_text())
            if found != self._meta():
                raise ValueError(
                    f"replay directory {self.directory} holds a replay of shape {found}, "
                    f"not {self._meta()}: another run's replay; point data.replay_dir elsewhere or move that "
                    "directory aside (its files belong to that run)"
                )
        if not exists:
            self._allocate_files(shapes)
        data = {
            k: np.memmap(self.directory / f"{k}.bin", dtype=d, mode="r+", shape=s)
            for k, (s, d) in shapes.items()
        }
        # Written with every add, so after a crash the files say how far they got.
        count = np.memmap(
            self.directory / "count.bin", dtype=np.int64, mode="r+", shape=(self.num_lanes,)
        )
        if not exists:
            meta_path.write_text(json.dumps(self._meta()))
        return data, count

    def _allocate_files(self, shapes) -> None:
        """Reserve the disk space up front: a full disk then fails here, not as a SIGBUS mid-run."""
        for k, (s, d) in shapes.items():
            nbytes = int(np.prod(s)) * np.dtype(d).itemsize
            fd = os.open(self.directory / f"{k}.bin", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                raise OSError(
                    f"cannot reserve {nbytes / 2**30:.1f} GiB for the replay in {self.directory}: "
                    f"{e.strerror}; lower replay_capacity or choose another replay_dir"
                ) from e
            finally:
                os.close(fd)
        with open(self.directory / "count.bin", "wb") as f:
            f.write(bytes(8 * self.num_lanes))

    def _release_pages(self, nbytes: int) -> None:
        """Drop mapped pages from this process once ``release_every_bytes`` were touched.

        The pages stay in the OS page cache (and dirty ones are still written back), so nothing is
        lost; they just stop counting towards this process's resident memory.
        """
        if self.storage != "memmap":
            return
        self._touched += nbytes
        if self._touched < self._release_every:
            return
        self._touched = 0
        for arr in self.data.values():
            release_memmap_pages(arr)

    def flush(self) -> None:
        """Write memory-mapped pages to disk (no-op in RAM)."""
        if self.storage == "memmap":
            for arr in (*self.data.values(), self.count):
                arr.flush()

    # ---------------------------------------------------------------- writing
    def __len__(self) -> int:
        return int(self.size.sum())

    @property
    def bytes_per_step(self) -> float:
        return sum(a.nbytes for a in self.data.values()) / self.capacity

    def add(
        self,
        frames: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        is_first: np.ndarray,
        is_last: np.ndarray,
        is_terminal: np.ndarray,
        lanes: np.ndarray | None = None,
        deter: np.ndarray | None = None,
        stoch: np.ndarray | None = None,
    ) -> None:
        """Append one step to each of ``lanes`` (all lanes when None); arrays are per lane. With
        ``deter`` (n, D) and ``stoch`` class indices (n, S), a replay that keeps latents stores
        them as the step's latent state (the acting policy's posterior there)."""
        if lanes is None:
            lanes = self._all_lanes
        else:
            lanes = np.asarray(lanes, np.int64)
            if len(lanes) == 0:
                return
            if len(np.unique(lanes)) != len(lanes):
                raise ValueError("add() writes one step per lane; lanes must not repeat")
        count = self.count[lanes]
        heads = count % self.lane_capacity
        d = self.data
        d["frames"][lanes, heads] = frames
        d["action"][lanes, heads] = action
        d["reward"][lanes, heads] = reward
        flags = np.asarray(is_first, np.uint8) * FIRST
        flags |= np.asarray(is_last, np.uint8) * LAST
        flags |= np.asarray(is_terminal, np.uint8) * TERMINAL
        if deter is not None and self.latents is not None:
            d["deter"][lanes, heads] = deter
            d["stoch"][lanes, heads] = stoch
            flags |= LATENT
        d["flags"][lanes, heads] = flags
        self.count[lanes] = count + 1
        self.size[lanes] = np.minimum(self.size[lanes] + 1, self.lane_capacity)
        self._release_pages(len(lanes) * self._frame_bytes)

    def clear(self) -> None:
        """Forget every stored step (the storage is kept and overwritten)."""
        self.count[...] = 0
        self.size = np.zeros(self.num_lanes, np.int64)

    # ---------------------------------------------------------------- sampling
    def can_sample(self, length: int) -> bool:
        return bool((self.size >= length).any())

    def sample(self, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """``batch_size`` sequences of ``length`` consecutive steps, uniform over valid starts.

        Returns ``frames`` uint8 (B, T, *obs_shape), ``action`` int64 (B, T), ``reward`` float32
        (B, T), ``is_first`` / ``is_last`` / ``is_terminal`` bool (B, T), and where they came from:
        ``lane`` (B,) and ``step`` (B, T), each step's index in its lane counted since the lane's
        first write (what ``store_latents`` takes). With latents also ``deter`` float16 (B, T, D),
        ``stoch`` uint8 (B, T, S) and ``has_latent`` bool (B, T).
        """
        starts_per_lane = np.maximum(self.size - length + 1, 0)
        total = int(starts_per_lane.sum())
        if total == 0:
            raise ValueError(
                f"replay cannot give sequences of length {length} yet: its longest lane holds "
                f"{int(self.size.max())} steps"
            )
        pick = self.rng.integers(0, total, size=batch_size)
        bounds = np.cumsum(starts_per_lane)
        lane = np.searchsorted(bounds, pick, side="right")
        offset = pick - (bounds[lane] - starts_per_lane[lane])
        first_valid = self.count[lane] - self.size[lane]
        step = (first_valid + offset)[:, None] + np.arange(length)[None, :]  # (B, T) absolute
        slot = step % self.lane_capacity  # (B, T) physical slot of each step
        lane_bt = lane[:, None]
        flags = self.data["flags"][lane_bt, slot]
        out = {
            "frames": self.data["frames"][lane_bt, slot],
            "action": self.data["action"][lane_bt, slot].astype(np.int64),
            "reward": np.array(self.data["reward"][lane_bt, slot]),
            "is_first": (flags & FIRST) > 0,
            "is_last": (flags & LAST) > 0,
            "is_terminal": (flags & TERMINAL) > 0,
            "lane": lane,
            "step": step,
        }
        if self.latents is not None:
            out["deter"] = self.data["deter"][lane_bt, slot]
            out["stoch"] = self.data["stoch"][lane_bt, slot]
            out["has_latent"] = (flags & LATENT) > 0
        self._release_pages(out["frames"].nbytes)
        return out

    def store_latents(self, lane: np.ndarray, step: np.ndarray, deter: np.ndarray, stoch: np.ndarray) -> int:
        """Write latent states for steps (B, T) of lanes (B,) (as ``sample`` gave them): ``deter``
        (B, T, D) and ``stoch`` class indices (B, T, S). Steps whose slot has been overwritten
        since they were sampled are skipped. Returns the number of steps written."""
        if self.latents is None:
            raise ValueError("this replay keeps no latents (create it with latents=...)")
        lane_bt = np.broadcast_to(np.asarray(lane)[:, None], step.shape)
        alive = step >= (self.count[lane_bt] - self.lane_capacity)  # not overwritten yet
        lane_s, step_s = lane_bt[alive], step[alive]
        slot = step_s % self.lane_capacity
        self.data["deter"][lane_s, slot] = deter[alive].astype(np.float16)
        self.data["stoch"][lane_s, slot] = stoch[alive].astype(np.uint8)
        self.data["flags"][lane_s, slot] |= LATENT
        return int(alive.sum())

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters and sampling RNG; in RAM the written slots too (as tensors), on disk only the files' shape.

        Slots no lane has reached yet are left out, so a checkpoint grows with the steps stored,
        not with the capacity.
        """
        state = {
            **self._meta(),
            "storage": self.storage,
            "count": torch.from_numpy(np.array(self.count)),
            "size": torch.from_numpy(self.size.copy()),
            "rng": self.rng.bit_generator.state,
        }
        if self.storage == "ram":
            written = min(int(np.max(self.count, initial=0)), self.lane_capacity)
            state["data"] = {k: torch.from_numpy(v[:, :written].copy()) for k, v in self.data.items()}
        else:
            self.flush()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to the replay as it was when ``state`` was taken.

        On disk, steps written after that moment (by a run that then died) are dropped, and so are
        the older steps they overwrote; everything else is reused from the files. In RAM, latents
        are restored when both replays keep latents of the same sizes; a replay saved without them
        (or with other sizes, or restored into one without) comes back without latents.
        """
        shape = {k: state.get(k) for k in ("num_lanes", "lane_capacity", "obs_shape")}
        if shape != {k: v for k, v in self._meta().items() if k != "latents"}:
            raise ValueError(f"the checkpoint's replay has shape {shape}, this run's {self._meta()}; resume "
                             "with the checkpoint's data.num_envs and data.replay_capacity")
        if state["storage"] != self.storage:
            raise ValueError(
                f"the checkpoint's replay used storage {state['storage']!r}, this run {self.storage!r}; "
                f"resume with --data.replay_storage {state['storage']}"
            )
        count = state["count"].numpy().astype(np.int64)
        size = state["size"].numpy().astype(np.int64)
        if self.storage == "ram":
            same_latents = state.get("latents") == self.latents
            for k, arr in self.data.items():
                v = state["data"].get(k) if same_latents or k in FIELDS else None
                written = v.shape[1] if v is not None else 0  # (lanes, written slots, ...)
                if v is not None:
                    arr[:, :written] = v.numpy()
                arr[:, written:] = 0
            if not same_latents:
                self.data["flags"] &= np.uint8(~LATENT & 0xFF)
        else:
            on_disk = np.array(self.count)
            if (on_disk < count).any():
                raise ValueError(
                    f"replay files in {self.directory} hold fewer steps ({on_disk.tolist()}) than "
                    f"the checkpoint recorded ({count.tolist()}): they belong to another run"
                )
            overwritten = on_disk - count
            size = np.clip(np.minimum(size, self.lane_capacity - overwritten), 0, None)
        self.count[...] = count
        self.size = size
        self.rng.bit_generator.state = state["rng"]


def replay_batch(sample: dict[str, np.ndarray], context: bool = False) -> dict[str, torch.Tensor]:
    """A ``SequenceReplay.sample`` as the model's batch: obs, action, reward, is_first, is_last,
    is_terminal, each (B, T, ...), and ``lane`` (B,) / ``step`` (B, T) where the steps came from.

    With ``context`` the sample holds T + 1 steps with latents (DreamerV3's replay context): the
    first step only supplies the starting state, ``context`` = {``deter`` (B, D) float32,
    ``stoch`` (B, S) class indices, ``valid`` (B,) whether a latent was stored there, ``action``
    (B,) the action taken from it}, and the other T steps are trained on.
    """
    batch = {
        "obs": torch.from_numpy(sample["frames"]),
        "action": torch.from_numpy(sample["action"]),
        "reward": torch.from_numpy(sample["reward"]),
        "is_first": torch.from_numpy(sample["is_first"]),
        "is_last": torch.from_numpy(sample["is_last"]),
        "is_terminal": torch.from_numpy(sample["is_terminal"]),
        "lane": torch.from_numpy(sample["lane"]),
        "step": torch.from_numpy(sample["step"]),
    }
    if not context:
        return batch
    start = {
        "deter": torch.from_numpy(sample["deter"][:, 0].astype(np.float32)),
        "stoch": torch.from_numpy(sample["stoch"][:, 0].astype(np.int64)),
        "valid": torch.from_numpy(sample["has_latent"][:, 0] & ~sample["is_last"][:, 0]),
        "action": batch["action"][:, 0],
    }
    batch = {k: v if k == "lane" else v[:, 1:] for k, v in batch.items()}
    batch["context"] = start
    return batch


def store_posteriors(replay: SequenceReplay, batch: dict[str, torch.Tensor], post: dict[str, torch.Tensor]) -> None:
    """Write the posterior states (B, T, ...) a model computed for ``batch`` (from ``replay_batch``)
    back into ``replay``, to start later sequences from (replay context)."""
    replay.store_latents(
        batch["lane"].cpu().numpy(), batch["step"].cpu().numpy(),
        post["deter"].detach().to(torch.float16).cpu().numpy(),
        post["stoch"].detach().argmax(-1).cpu().numpy(),
    )
