"""Runs that survive the real world (tisdpo/run_safety.py): checkpoints complete only with their marker, resume from
the newest complete one past damaged files, kill -9 at random points of a save loop resuming bit-identically, a full
disk said in one line, SIGTERM saving and exiting 0, one writer per output_dir."""

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.trainer.tiny import dataset_of, no_checkpointing, tiny_llama
from tisdpo import TISDPOConfig, TISDPOTrainer, cli
from tisdpo.run_safety import (
    COMPLETE_MARKER,
    LOCK_FILE,
    checkpoint_problem,
    checkpoints,
    newest_complete_checkpoint,
    output_dir_lock,
    resolve_resume_from_checkpoint,
)
from tisdpo.validation import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW = {"prompt": "Name a fruit:", "chosen": " apple", "rejected": " rock"}


@pytest.fixture(scope="module")
def run_files(tok, tmp_path_factory):
    """A saved tiny model (with its tokenizer) and an 8-pair JSONL file."""
    root = tmp_path_factory.mktemp("run")
    model = root / "model"
    tiny_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(dict(ROW, prompt=f"Name fruit {i}:")) + "\n" for i in range(8)))
    return str(model), str(data)


def _argv(run_files, out, *extra):
    model, data = run_files
    checkpointing = next(iter(no_checkpointing()))
    return ["train", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out),
            "--use_cpu", "true", "--report_to", "none", "--per_device_train_batch_size", "2", "--seed", "0",
            "--disable_tqdm", "true", "--logging_steps", "1", f"--{checkpointing}", "false",
            "--dataloader_num_workers", "0", *extra]


SAVE_EVERY_STEP = ("--save_strategy", "steps", "--save_steps", "1")


def _spawn(argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "tisdpo", *argv], env=env, cwd=ROOT, text=True, **kwargs)


@pytest.fixture(scope="module")
def two_checkpoints(run_files, tmp_path_factory):
    """An output_dir with complete checkpoint-1 and checkpoint-2 (saved by `tisdpo train`, in this process)."""
    out = tmp_path_factory.mktemp("saved") / "out"
    assert cli.main(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", "2")) == 0
    return out


def test_a_checkpoint_is_complete_only_with_its_marker(two_checkpoints):
    for step in (1, 2):
        assert checkpoint_problem(str(two_checkpoints / f"checkpoint-{step}")) is None
    assert not os.path.exists(two_checkpoints / LOCK_FILE)  # released at the end of the run


# how the newest checkpoint is spoiled, and the phrase naming the file
DAMAGE = {
    "truncated-model": ("model.safetensors", lambda p: _truncate(p, 0.5), "model.safetensors is truncated"),
    "truncated-optimizer": ("optimizer.pt", lambda p: _truncate(p, 0.7), "optimizer.pt is truncated"),
    "truncated-rng": ("rng_state.pth", lambda p: _truncate(p, 0.5), "rng_state.pth is truncated"),
    "empty-trainer-state": ("trainer_state.json", lambda p: _truncate(p, 0.0), "trainer_state.json is truncated"),
    "missing-trainer-state": ("trainer_state.json", os.remove, "trainer_state.json is missing"),
    "no-marker": (COMPLETE_MARKER, os.remove, f"no {COMPLETE_MARKER} (its save was interrupted)"),
}


def _truncate(path, fraction):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_true_falls_back_past_a_damaged_newest_checkpoint(case, two_checkpoints, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    name, spoil, phrase = DAMAGE[case]
    spoil(str(out / "checkpoint-2" / name))
    with caplog.at_level(logging.WARNING, logger="tisdpo.run_safety"):
        assert resolve_resume_from_checkpoint("true", str(out)) == str(out / "checkpoint-1")
    assert f"Skipping {out / 'checkpoint-2'}: {phrase}" in caplog.text
    with pytest.raises(InputError, match=re.escape(f"--resume_from_checkpoint {out / 'checkpoint-2'}: {phrase}")):
        resolve_resume_from_checkpoint(str(out / "checkpoint-2"), str(out))


def test_resume_true_without_any_complete_checkpoint(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    for step in (1, 2):
        os.remove(out / f"checkpoint-{step}" / COMPLETE_MARKER)
    with pytest.raises(InputError, match="none of its 2 checkpoint-\\* directories is complete"):
        resolve_resume_from_checkpoint("true", str(out))


def test_cli_resumes_from_the_last_complete_checkpoint(run_files, two_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    _truncate(str(out / "checkpoint-2" / "optimizer.pt"), 0.5)
    assert cli.main(_argv(run_files, out, "--max_steps", "3", "--resume_from_checkpoint", "true")) == 0
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    # the resumed run started from checkpoint-1: steps 2 and 3 were trained again
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_kill_9_at_random_points_of_a_save_loop_resumes_bit_identically(run_files, tmp_path):
    steps = 6
    argv = [*_argv(run_files, tmp_path / "ref", *SAVE_EVERY_STEP, "--max_steps", str(steps))]
    assert _spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300) == 0
    expected = _weights(tmp_path / "ref")

    out = tmp_path / "out"
    rng = random.Random(21)
    kills = torn = 0  # torn: kills that left a checkpoint without its marker (killed inside a save)
    for _ in range(16):
        resume = ["--resume_from_checkpoint", "true"] if newest_complete_checkpoint(str(out)) else []
        proc = _spawn(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", str(steps), *resume),
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = set(os.listdir(out)) if out.exists() else set()
        # a save takes some 20 ms here: kill at a random moment of the first 30 ms after a new checkpoint
        # directory appears, i.e. mostly inside the save, sometimes just after it
        while proc.poll() is None:
            now = set(os.listdir(out)) if out.exists() else set()
            if any(n.startswith("checkpoint-") for n in now - seen):
                time.sleep(rng.uniform(0.0, 0.03))
                proc.kill()
                break
            time.sleep(0.001)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:  # finished before the kill: start again from scratch
            shutil.rmtree(out)
            continue
        assert proc.returncode == -signal.SIGKILL, err  # the resumed run worked until it was killed
        kills += 1
        torn += any(checkpoint_problem(c) is not None for c in checkpoints(str(out)))
        if kills >= 4 and torn >= 2:
            break
    else:
        pytest.fail(f"{kills} kills, {torn} inside a save: the kills did not hit the save loop")
    final = _spawn(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", str(steps), "--resume_from_checkpoint",
                         "true"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    got = _weights(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_disk_full_during_a_save_is_one_line(run_files, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    status = cli.main(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert err.startswith(f"tisdpo: error: the disk is full: saving checkpoint-2 (the partial checkpoint-2 was "
                          f"removed) in {out} failed ([Errno {errno.ENOSPC}] No space left on device); checkpoint-1 is "
                          "the newest complete checkpoint; free space and rerun with --resume_from_checkpoint true")
    assert not (out / "checkpoint-2").exists()
    assert checkpoint_problem(str(out / "checkpoint-1")) is None
    assert not (out / LOCK_FILE).exists()


def _kill_tree(proc):
    """End `proc` and its children if a failed test left them running."""
    if proc.poll() is not None:
        return
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # no psutil, or the process ended meanwhile
        children = []
    for child in children:
        child.kill()
    proc.kill()
    proc.wait(timeout=30)


def test_disk_full_during_the_final_save_is_one_line(run_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save_file = transformers.modeling_utils.safe_save_file

    def full(tensors, filename, *args, **kwargs):  # the final model goes to out itself, checkpoints below it
        if os.path.dirname(str(filename)) == str(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    status = cli.main(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert err.startswith(f"tisdpo: error: the disk is full: saving the final model in {out} failed (")
    assert "checkpoint-2 is the newest complete checkpoint" in err


def _lines_of(stream, into):
    for line in stream:
        into.append(line)


def test_sigterm_saves_and_a_second_writer_is_refused(run_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(run_files, out, "--max_steps", "100000", "--save_strategy", "no")
    first = _spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = [], []
        readers = [threading.Thread(target=_lines_of, args=(s, into), daemon=True)
                   for s, into in ((first.stdout, stdout), (first.stderr, stderr))]
        for r in readers:
            r.start()
        deadline = time.time() + 240
        while not any("'loss'" in line for line in stdout):  # training has started
            assert first.poll() is None and time.time() < deadline, "".join(stderr)
            time.sleep(0.1)

        # a second run into the same output_dir: refused before any model loads, naming the first
        status = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert status == 2
        assert err.startswith(f"tisdpo: error: --output_dir {out}: another `tisdpo train` writes there "
                              f"(pid {first.pid} on {socket.gethostname()}")

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
        for r in readers:
            r.join(timeout=10)
        last = [line for line in stderr if line.startswith("tisdpo: stopped by SIGTERM")]
        assert last and last[-1].rstrip().endswith("--resume_from_checkpoint true"), "".join(stderr)
        saved = newest_complete_checkpoint(str(out))
        assert saved is not None and checkpoint_problem(saved) is None
        assert not (out / LOCK_FILE).exists()
        assert not (out / "model.safetensors").exists()  # not a finished run: no final model
    finally:
        _kill_tree(first)


def test_a_dead_process_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="tisdpo.run_safety"):
        with output_dir_lock(str(tmp_path)):
            with open(tmp_path / LOCK_FILE) as f:
                assert json.load(f)["pid"] == os.getpid()
    assert f"of pid {dead.pid} on {socket.gethostname()} (started earlier): that process no longer runs" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_rotation_keeps_complete_checkpoints(run_files, tmp_path):
    out = tmp_path / "out"
    assert cli.main(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", "3", "--save_total_limit", "2")) == 0
    assert sorted(os.path.basename(c) for c in checkpoints(str(out))) == ["checkpoint-2", "checkpoint-3"]
    assert all(checkpoint_problem(c) is None for c in checkpoints(str(out)))


def test_torch_writer_failing_on_a_full_disk_is_one_line(run_files, tmp_path, capsys, monkeypatch):
    """What torch.save raises when the disk fills (no errno): said as a full disk when little space is left."""
    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2432 vs 2326")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 20))
    out = tmp_path / "out"
    status = cli.main(_argv(run_files, out, *SAVE_EVERY_STEP, "--max_steps", "3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert err.startswith(f"tisdpo: error: the disk is full: saving checkpoint-2 (the partial checkpoint-2 was "
                          f"removed) in {out} failed ([enforce fail")
    assert err.endswith("free space and rerun with --resume_from_checkpoint true")


def test_trainer_api_resume_true_skips_a_damaged_checkpoint(tok, run_files, two_checkpoints, tmp_path, caplog,
                                                            quick_args):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    _truncate(str(out / "checkpoint-2" / "rng_state.pth"), 0.5)
    rows = [dict(ROW, prompt=f"Name fruit {i}:") for i in range(8)]
    args = TISDPOConfig(**{**quick_args, "output_dir": str(out), "per_device_train_batch_size": 2}, max_steps=3)
    trainer = TISDPOTrainer(run_files[0], args=args, train_dataset=dataset_of(rows),
                            processing_class=tok)
    with caplog.at_level(logging.WARNING, logger="tisdpo.run_safety"):
        trainer.train(resume_from_checkpoint=True)
    assert f"Skipping {out / 'checkpoint-2'}: rng_state.pth is truncated" in caplog.text
    assert trainer.state.global_step == 3


def test_sigterm_to_one_process_of_two_stops_both_at_the_same_step(run_files, tmp_path):
    """torchrun, 2 CPU processes (gloo): SIGTERM reaches rank 1 only; both save one checkpoint and exit 0 (without
    the shared stop flag rank 0 would wait forever in the next gradient all-reduce)."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    argv = [*_argv(run_files, out, "--max_steps", "100000", "--save_strategy", "no", "--ddp_backend", "gloo")][1:]
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(29500 + os.getpid() % 1000), "-m", "tisdpo", "train", *argv],
                                env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = [], []
        readers = [threading.Thread(target=_lines_of, args=(s, into), daemon=True)
                   for s, into in ((launcher.stdout, stdout), (launcher.stderr, stderr))]
        for r in readers:
            r.start()
        deadline = time.time() + 300
        while not any("'loss'" in line for line in stdout):
            assert launcher.poll() is None and time.time() < deadline, "".join(stderr)
            time.sleep(0.1)
        workers = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launcher.pid).children(recursive=True)}
        workers[1].send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, "".join(stderr)
        for r in readers:
            r.join(timeout=10)
        saved = newest_complete_checkpoint(str(out))
        assert saved is not None
        assert sum(line.startswith("tisdpo: stopped by") for line in stderr) == 1, "".join(stderr)
        assert not (out / LOCK_FILE).exists()
    finally:
        _kill_tree(launcher)
