"""Tests of the training plumbing in common.py (issue 2): schedule, distributed helpers, resume, signals,
atomic checkpoints, NaN guard, the 2-process CPU path, the kNN monitor."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tiny_loop_script.py")
sys.path.insert(0, HERE)
import tiny_loop_script  # noqa: E402


def run_tiny(out_dir, *extra):
    """Run the tiny method script in this process (no subprocess start-up)."""
    argv = sys.argv
    sys.argv = ["tiny_loop_script.py", "--out-dir", str(out_dir), *map(str, extra)]
    try:
        tiny_loop_script.main()
    finally:
        sys.argv = argv


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


# ------------------------------------------------------------------------------------------- LR schedule
def test_cosine_schedule_with_warmup_at_key_steps():
    lr = lambda s: common.lr_at_step(s, total_steps=110, base_lr=1.0, warmup_steps=10, final_lr=0.1)
    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10 of the base
    assert lr(9) == pytest.approx(1.0)  # end of warm-up
    assert lr(10) == pytest.approx(1.0)  # cosine starts at the base
    assert lr(60) == pytest.approx(0.55)  # half-way: (base + final) / 2
    assert lr(110) == pytest.approx(0.1)  # the end is the final LR
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))


def test_multistep_and_constant_schedules():
    lr = lambda s: common.lr_at_step(s, 100, 0.5, "multistep", milestones=[30, 60], gamma=0.1)
    assert [lr(0), lr(29), lr(30), lr(59), lr(60), lr(99)] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    assert common.lr_at_step(77, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        common.lr_at_step(0, 10, 0.1, "linear")


# ------------------------------------------------------------------------------------------- distributed helpers
def test_collectives_are_identity_at_world_size_1():
    x = torch.randn(3, 4)
    assert common.get_world_size() == 1 and common.get_rank() == 0
    assert common.all_gather_nograd(x) is x
    assert common.all_reduce(x, "sum") is x and common.all_reduce(x, "mean") is x
    assert common.all_gather_objects({"a": 1}) == [{"a": 1}]


def _collectives_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.full((2, 3), float(rank + 1))  # rank 0: ones, rank 1: twos
    gathered = common.all_gather_nograd(x)
    results[rank] = {"gathered": gathered.tolist(), "sum": common.all_reduce(x, "sum").tolist(),
                     "mean": common.all_reduce(x, "mean").tolist(), "world": common.get_world_size(),
                     "objects": common.all_gather_objects(rank * 10), "x_after": x.tolist()}
    dist.destroy_process_group()


def test_collectives_at_world_size_2_with_gloo():
    results = mp.Manager().dict()
    mp.spawn(_collectives_worker, args=(common._find_free_port(), results), nprocs=2)
    for rank in (0, 1):
        r = results[rank]
        assert r["world"] == 2
        assert r["gathered"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2  # rank order along dim 0
        assert r["sum"] == [[3.0] * 3] * 2 and r["mean"] == [[1.5] * 3] * 2
        assert r["objects"] == [0, 10]
        assert r["x_after"] == [[float(rank + 1)] * 3] * 2  # all_reduce does not modify its input


def test_more_gpus_than_visible_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = common.get_common_parser().parse_args(["--gpus", "3"])
    with pytest.raises(common.UserError, match="--gpus 3: expected at most the visible GPUs, found 0 visible"):
        common.resolve_device_and_processes(args)
    args = common.get_common_parser().parse_args(["--device", "cpu", "--gpus", "2"])
    assert common.resolve_device_and_processes(args) == ("cpu", 2)


# ------------------------------------------------------------------------------------------- the loop
def test_tiny_model_trains_and_writes_the_run_folder(tmp_path):
    run_tiny(tmp_path, "--epochs", 4)
    steps_and_losses = losses(tmp_path)
    assert [s for s, _ in steps_and_losses] == list(range(1, 17))  # 64 samples / 16 = 4 steps x 4 epochs
    first, last = steps_and_losses[0][1], steps_and_losses[-1][1]
    assert last < 0.3 * first
    assert {"args.json", "metrics.jsonl", "checkpoint.pth", "backbone.pth"} <= set(os.listdir(tmp_path))
    args = json.load(open(tmp_path / "args.json"))
    assert args["batch_size"] == 16 and "git_commit" in args and args["world_size"] == 1
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert {"step", "epoch", "lr", "loss", "acc", "samples_per_s", "data_time", "step_time"} <= set(record)
    backbone = torch.load(tmp_path / "backbone.pth", weights_only=False)
    assert backbone["meta"]["arch"] == "tiny-mlp" and "0.weight" in backbone["state_dict"]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 16 and ckpt["model"]["steps_seen"].item() == 16  # method buffers are carried
    assert {"model", "optimizer", "scaler", "rng", "args", "epoch"} <= set(ckpt)


def test_schedule_epochs_stops_part_way_down_the_cosine(tmp_path):
    """--schedule-epochs 8 with --epochs 4: 16 steps of a 32-step cosine (released tubelet models: 200 / 100)."""
    run_tiny(tmp_path, "--epochs", 4, "--schedule-epochs", 8)
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "lr" in r]
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 32)) for s in range(16)]
    assert len(lrs) == 16 and lrs == pytest.approx(expected, rel=1e-4)
    assert lrs[-1] > 0.05  # stopped above half the base LR, not annealed to 0


def test_resume_gives_identical_losses_at_every_step(tmp_path):
    run_tiny(tmp_path / "straight", "--max-steps", 10)
    run_tiny(tmp_path / "resumed", "--max-steps", 5)  # stops mid-epoch 1 (4 steps per epoch)
    assert losses(tmp_path / "resumed")[-1][0] == 5
    run_tiny(tmp_path / "resumed", "--max-steps", 10)  # --resume auto continues at step 5
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_resume_none_starts_afresh(tmp_path):
    run_tiny(tmp_path, "--max-steps", 3)
    run_tiny(tmp_path, "--max-steps", 3, "--resume", "none")
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 1, 2, 3]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    common.save_atomic({"step": 1}, path)
    real_save = torch.save

    def crashing_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written file, then the machine "dies"
        raise OSError("simulated crash during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        common.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(common.NonFiniteLossError, match=r"loss is nan at step 6 .*checkpoint.pth"):
        run_tiny(tmp_path, "--nan-at-step", 6, "--ckpt-every", 5)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 5  # written at step 5, never overwritten by the NaN state
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigterm_saves_and_the_rerun_continues(tmp_path):
    cmd = [sys.executable, SCRIPT, "--out-dir", str(tmp_path), "--epochs", "50", "--step-sleep", "0.05"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (tmp_path / "metrics.jsonl").exists() or len(losses(tmp_path)) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == common.EXIT_INTERRUPTED, out  # an interrupted run is not a finished one
    assert "interrupted: saved step" in out and "rerun the same command" in out
    interrupted_at = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["step"]
    assert 5 <= interrupted_at < 200
    done = subprocess.run(cmd[:4] + ["--epochs", "50", "--max-steps", str(interrupted_at + 3)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {tmp_path / 'checkpoint.pth'} at step {interrupted_at}" in done.stdout
    assert [s for s, _ in losses(tmp_path)][-3:] == [interrupted_at + 1, interrupted_at + 2, interrupted_at + 3]


def test_two_cpu_processes_train_and_only_rank0_writes(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--gpus", "2", "--out-dir", str(tmp_path),
                          "--max-steps", "6"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "processes: 2 on cpu; batch size 16 global = 8 per process" in out.stdout
    assert out.stdout.count("command:") == 1  # only rank 0 prints
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]  # one line per step, not one per rank
    # 64 samples / 16 global = 4 steps per epoch: the sampler split the data between the two processes
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert len(torch.load(tmp_path / "checkpoint.pth", weights_only=False)["rng"]) == 2


@pytest.mark.slow
def test_torchrun_on_cpu(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc_per_node", "2", SCRIPT, "--device", "cpu", "--out-dir", str(tmp_path),
                          "--max-steps", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "processes: 2 on cpu" in out.stdout
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- kNN monitor
def test_weighted_knn_and_1nn_against_hand_computed_votes():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[0.96, 0.28]])  # cosine similarities: 0.96, 0.936, 0.28, -0.96
    knn, nn1 = common.knn_classify(train, labels, test, num_classes=3, k=3, temperature=0.1)
    # votes: class 0: e^9.6 = 14764.8; class 1: e^9.36 + e^2.8 = 11614.7 + 16.4 -> class 0 wins, 1-NN is class 0
    assert knn.tolist() == [0] and nn1.tolist() == [0]
    knn, _ = common.knn_classify(train, labels, test, num_classes=3, k=3, temperature=1.0)
    # T = 1: class 0: e^0.96 = 2.61; class 1: e^0.936 + e^0.28 = 2.55 + 1.32 = 3.87 -> class 1
    assert knn.tolist() == [1]


# ------------------------------------------------------------------------------------------- honest failures
def run_script(*argv, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_inline(capsys, *argv):
    """The script's main(argv) in this process, for runs that end in an error: (exit code, stdout, stderr). The same
    code path as run_script without starting an interpreter."""
    with pytest.raises(SystemExit) as stop:
        tiny_loop_script.main(list(map(str, argv)))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


@pytest.mark.parametrize("argv, expected", [
    (["--device", "cpu", "--gpus", "2", "--batch-size", "15"], "--batch-size: expected a positive multiple of the 2 "
                                                                "processes (it is global), found 15"),
    (["--gpus", "3"], "--gpus 3: expected at most the visible GPUs, found 0 visible"),
    (["--lr", "0"], "--lr: expected a learning rate > 0, found 0.0"),
    (["--epochs", "0"], "--epochs: expected at least 1, found 0"),
    (["--resume", "/nonexistent/checkpoint.pth"], "--resume: expected a checkpoint file, auto or none; found no "
                                                  "file /nonexistent/checkpoint.pth"),
    (["--data", "k4000"], "--data: expected one of toy-motion, toy-ucfrep"),
    (["--data", "ucf101", "--data-root", "/nonexistent/ucf"], "--data ucf101: expected the dataset under "
                                                               "--data-root /nonexistent/ucf, found no such folder"),
    (["--device", "cpu", "--gpus", "2", "--data", "k4000"], "found 'k4000'"),  # in the spawned workers
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, argv, expected, capsys):
    if "--gpus" in argv and "--data" in argv:  # the data check runs in the spawned workers: a real command line
        out = run_script("--out-dir", tmp_path / "run", *argv)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    else:
        code, stdout, stderr = run_inline(capsys, "--out-dir", tmp_path / "run", *argv)
    assert code == common.EXIT_USER_ERROR, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "run").exists()  # not even the empty run folder


def test_missing_annotation_file_names_the_path(tmp_path, capsys):
    (tmp_path / "ucf").mkdir()
    code, _, stderr = run_inline(capsys, "--out-dir", tmp_path / "run", "--data", "ucf101",
                                 "--data-root", tmp_path / "ucf")
    assert code == common.EXIT_USER_ERROR
    assert stderr.strip() == (f"error: --data ucf101 (--data-root {tmp_path / 'ucf'}): "
                                  f"{tmp_path / 'ucf' / 'ucfTrainTestlist' / 'classInd.txt'}: missing; "
                                  f"expected '1 ApplyEyeMakeup' lines")


def test_unwritable_out_dir_and_debug_traceback(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, _, stderr = run_inline(capsys, "--out-dir", tmp_path / "a_file" / "run")
    assert code == common.EXIT_USER_ERROR
    assert stderr.strip() == f"error: --out-dir {tmp_path / 'a_file' / 'run'}: expected a folder, found a file " \
                                 f"at {tmp_path / 'a_file'}"
    out = run_script("--out-dir", tmp_path / "run", "--lr", "-1", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "common.UserError: --lr" in out.stderr


def test_a_mistyped_command_leaves_a_finished_run_untouched(tmp_path, capsys):
    run_tiny(tmp_path, "--max-steps", 3)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != "tb"}
    code, _, stderr = run_inline(capsys, "--out-dir", tmp_path, "--data", "ucf-101")
    assert code == common.EXIT_USER_ERROR and "found 'ucf-101'" in stderr
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path) if name != "tb"}
    assert after == before and json.loads(before["args.json"])["data"] == "blobs"


# ------------------------------------------------------------------------------------------- signals, checkpoints
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_process_group_signal_with_workers_saves_and_exits_nonzero(tmp_path, sig):
    """A scheduler signals every process of the job, DataLoader workers included."""
    cmd = [sys.executable, SCRIPT, "--out-dir", str(tmp_path / "run"), "--epochs", "50", "--step-sleep", "0.05",
           "--workers", "2"]
    log = tmp_path / "output.txt"  # a file, not a pipe: a full pipe would stall the script while we wait
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONFAULTHANDLER="1"))

    def logged():
        try:
            return len(losses(tmp_path / "run"))
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written; a line half written
            return 0

    deadline = time.time() + 120
    while time.time() < deadline and logged() < 5:
        time.sleep(0.2)
    if logged() < 5:  # stalled (seen once in a full suite run): every process's stacks
        os.killpg(proc.pid, signal.SIGABRT)
        proc.wait(timeout=60)
        pytest.fail(f"fewer than 5 losses after 120 s; output with faulthandler stacks:\n{log.read_text()}")
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == common.EXIT_INTERRUPTED, out
    assert "interrupted: saved step" in out and "killed by signal" not in out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert 5 <= ckpt["step"] < 200 and ckpt["step"] == losses(tmp_path / "run")[-1][0]
    assert torch.load(tmp_path / "run" / "backbone.pth", weights_only=False)["meta"]["step"] == ckpt["step"]


def test_stale_temporaries_are_removed_and_backbone_step_follows_the_checkpoint(tmp_path):
    run_tiny(tmp_path, "--max-steps", 4)
    (tmp_path / ".tmp-abc123.pth").write_bytes(b"half a checkpoint, then SIGKILL")
    (tmp_path / "args.json.tmp").write_text("{")
    record = torch.load(tmp_path / "backbone.pth", weights_only=False)
    assert record["meta"]["step"] == 4
    record["meta"]["step"] = 2  # killed after checkpoint.pth (step 4) was renamed, before backbone.pth was
    torch.save(record, tmp_path / "backbone.pth")
    run_tiny(tmp_path, "--max-steps", 6)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n.endswith(".tmp")]
    assert torch.load(tmp_path / "backbone.pth", weights_only=False)["meta"]["step"] == 6
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["step"] == 6


def test_background_save_writes_a_copy_not_the_live_tensors(tmp_path):
    saver = common.BackgroundSaver()
    weights = {"w": torch.zeros(3)}
    saver.submit([(common.cpu_copy(weights), tmp_path / "a.pth")])
    weights["w"].add_(1)  # training goes on while the thread writes
    saver.submit([(common.cpu_copy(weights), tmp_path / "b.pth")])  # joins the first: one save in flight
    saver.wait()
    assert torch.load(tmp_path / "a.pth")["w"].tolist() == [0, 0, 0]
    assert torch.load(tmp_path / "b.pth")["w"].tolist() == [1, 1, 1]
    saver.submit([({"w": 1}, tmp_path / "missing" / "c.pth")])
    with pytest.raises(FileNotFoundError):
        saver.wait()  # the thread's error reaches the training thread


# ------------------------------------------------------------------------------------------- the GPU step
def test_fit_syncs_once_per_log_window(tmp_path, monkeypatch):
    """Inside fit (train steps included), device-to-host transfers happen only on the --log-every steps. Counted:
    calls made by the loop and the method script (the DataLoader's own CPU-side .tolist() of its permutation is
    not a device transfer)."""
    calls = []
    ours = (os.path.abspath(common.__file__), os.path.abspath(SCRIPT))

    def counting(name, real):
        def wrapper(self, *a, **k):
            if os.path.abspath(sys._getframe(1).f_code.co_filename) in ours:
                calls.append(name)
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    run_tiny(tmp_path, "--epochs", 3, "--log-every", 4, "--knn-every", 0, "--ckpt-every", 100)
    assert [s for s, _ in losses(tmp_path)] == [4, 8, 12]  # 12 steps, one record per 4
    assert calls == ["tolist"] * 3, calls
    calls.clear()  # checkpoints (every epoch end: 4 steps) between log steps: one more sync each, no extra record
    run_tiny(tmp_path / "b", "--epochs", 3, "--log-every", 3, "--knn-every", 0, "--ckpt-every", 100)
    assert [s for s, _ in losses(tmp_path / "b")] == [3, 6, 9, 12]
    assert calls == ["tolist"] * 6, calls  # steps 3, 4, 6, 8, 9, 12


def test_nan_on_one_process_stops_every_process(tmp_path):
    out = run_script("--device", "cpu", "--gpus", "2", "--out-dir", tmp_path, "--nan-at-step", 6, "--nan-rank", 1,
                     "--ckpt-every", 5, "--log-every", 5, timeout=240)
    assert out.returncode != 0
    assert "loss is nan at step 6 (epoch 1)" in out.stdout + out.stderr
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["step"] == 5


def test_items_do_not_depend_on_the_workers(tmp_path):
    """Augmentation noise is seeded per (seed, rank, epoch, index): 0 or 2 workers give the same losses, so
    persistent workers and mid-epoch resumes stay exact."""
    run_tiny(tmp_path / "w0", "--max-steps", 6, "--workers", 0)
    run_tiny(tmp_path / "w2", "--max-steps", 6, "--workers", 2)
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


def test_amp_auto_never_picks_emulated_bf16(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or including_emulation)
    assert common.resolve_amp_dtype("auto", torch.device("cuda")) == torch.float16  # only emulated: fp16
    assert asked == [False]
    assert common.resolve_amp_dtype("auto", torch.device("cpu")) is None


def test_knn_monitor_chunks_match_one_matrix():
    g = torch.Generator().manual_seed(0)
    train, test = F_normalize(torch.randn(50, 8, generator=g)), F_normalize(torch.randn(23, 8, generator=g))
    train_labels, test_labels = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (23,), generator=g)
    knn, nn1 = common.knn_classify(train, train_labels, test, 4, k=10)
    expected = {"knn_top1": (knn == test_labels).float().mean().item() * 100,
                "nn1_top1": (nn1 == test_labels).float().mean().item() * 100}
    features = iter([(train, train_labels), (test, test_labels)])
    original = common.extract_features
    common.extract_features = lambda *a, **k: next(features)
    try:
        result = common.knn_monitor(None, None, None, None, run=type("R", (), {"rank": 0, "world_size": 1})(),
                                    k=10, chunk=5)
    finally:
        common.extract_features = original
    assert result == pytest.approx(expected)


def F_normalize(x):
    return torch.nn.functional.normalize(x, dim=1)


def test_loader_seeds_the_items_of_a_subset():
    """torch's Subset has __getitems__, which the DataLoader prefers: it must not bypass the per-item seeding."""
    subset = torch.utils.data.Subset(tiny_loop_script.BlobDataset(32, seed=0), list(range(16)))
    args = common.get_common_parser().parse_args(["--workers", "0", "--batch-size", "8"])
    run = type("R", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    first = torch.cat([b["x"] for b in common.build_loader(subset, args, run, train=False)])
    torch.manual_seed(123)  # the global RNG state does not decide the items
    again = torch.cat([b["x"] for b in common.build_loader(subset, args, run, train=False)])
    assert torch.equal(first, again)


class _ClipsAndIndices(torch.utils.data.Dataset):
    """Items shaped like VideoDataset's: a 16-frame uint8 clip (over 64 KiB) and small tensors of several dtypes."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        clip = torch.randint(0, 256, (3, 4, 64, 64), dtype=torch.uint8)  # (C, T, H, W), 48 KiB x 1
        return {"video": clip.repeat(1, 4, 1, 1), "label": torch.tensor(i % 3), "index": i,
                "frame_indices": torch.arange(16) * 2 + i, "weight": torch.tensor([0.5, i], dtype=torch.float16)}


def test_loader_workers_send_small_tensors_by_value_and_deliver_plain_tensors():
    args = common.get_common_parser().parse_args(["--workers", "0", "--batch-size", "4"])
    run = type("R", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    in_process = list(common.build_loader(_ClipsAndIndices(), args, run, train=False))
    args.workers = 2
    from_workers = list(common.build_loader(_ClipsAndIndices(), args, run, train=False))
    assert len(in_process) == len(from_workers) == 3
    for a, b in zip(in_process, from_workers):
        assert a.keys() == b.keys()
        for key in a:
            assert type(b[key]) is torch.Tensor and b[key].dtype == a[key].dtype and b[key].equal(a[key]), key
        assert b["video"].shape == (4, 3, 16, 64, 64) and b["video"].is_shared()  # one shared-memory handle
        assert not b["label"].is_shared() and not b["frame_indices"].is_shared()  # pickled by value
