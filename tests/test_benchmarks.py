"""The benchmark scripts keep working: gpu_report.py at its tiny CPU sizes writes a complete report; bench_input.py
and bench_decoder_resize.py measure what they say."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.script_run("benchmarks/gpu_report.py", "--tiny")
def test_gpu_report_runs_at_tiny_sizes_on_cpu(script_run):
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the CPU report (a GPU gets an MFU)")
    run_dir, _ = script_run  # run by conftest.ScriptRuns while other tests ran
    rows = json.load(open(run_dir / "gpu_report.json"))["rows"]
    assert set(rows) == {"moco_step", "moco_step_channels_last", "end_to_end", "tubelets", "skeleton_aug",
                         "s3d_step", "vicc_end_to_end", "vicc_end_to_end_decode_on_device"}
    assert rows["moco_step"]["samples_per_s"] > 0 and rows["moco_step"]["gflops_forward_per_clip"] > 0
    assert rows["moco_step"]["mfu"] is None  # no peak FLOPs for a CPU: no MFU is claimed
    for name in ("end_to_end", "vicc_end_to_end", "vicc_end_to_end_decode_on_device"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["samples_per_s"] > 0 and 0 <= rows[name]["data_share"] <= 1
    assert rows["tubelets"]["cpu_clips_per_s"] > 0 and rows["skeleton_aug"]["sequences_per_s"] > 0
    assert "| moco_step |" in (run_dir / "gpu_report.md").read_text()


def test_bench_input_raw_decode_reads_the_clips_the_dataset_reads(tmp_path):
    """The ratios compare like with like: raw / raw2 decode exactly the frames of the seeded dataset items."""
    import bench_input
    import common
    paths = bench_input.make_videos(str(tmp_path), "fmt", 64, 80, 16, count=2, frames=40)
    ds = common.SeededItems(common.VideoDataset([(p, 0) for p in paths], ["x"], clip_len=16,
                                                frame_strides=bench_input.STRIDES, num_clips=2), bench_input.SEED, 0)
    seen = []
    for epoch in (1, 2):
        for i in range(2):
            expected = ds[(epoch, i)]["frame_indices"].numpy()  # (2, 16)
            assert (bench_input.clip_indices(epoch, i, 40, 2) == expected).all()
            seen.append(expected)
    assert len({a.tobytes() for a in seen}) == 4  # epochs and items draw different clips


def test_bench_input_cpu_seconds_counts_the_ended_threads_of_another_process():
    """A loader worker's CPU time includes the threads it has finished (decord decodes in threads per file)."""
    import bench_input
    code = ("import threading, time\n"
            "def burn():\n    t = time.process_time()\n    while time.process_time() - t < 0.3:\n        pass\n"
            "th = threading.Thread(target=burn)\nth.start()\nth.join()\nprint('done', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        assert 0.3 <= bench_input.cpu_seconds([proc.pid]) < 5  # the thread's 0.3 s + interpreter start-up
    finally:
        proc.kill()
        proc.wait()


def test_bench_decoder_resize_scales_the_box_to_the_crop_and_every_path_gives_the_crop(tmp_path):
    """The decoder paths decode the frame at the scale that makes the box 112 x 112 and cut it where the box went."""
    import bench_decoder_resize as bench
    import bench_input
    import torch
    assert bench.scaled_box(240, 320, (60, 80, 120, 160)) == ((224, 224), (56, 56))
    assert bench.scaled_box(240, 320, (120, 160, 120, 160)) == ((224, 224), (112, 112))  # bottom-right corner
    assert bench.scaled_box(128, 170, (10, 20, 64, 85)) == ((224, 224), (18, 26))  # upscaled: the frame grows
    path = bench_input.make_videos(str(tmp_path), "fmt", 128, 170, 16, count=1, frames=40)[0]
    fns = bench.paths_for(128, 170)
    for name, fn in fns.items():
        out = fn(path, list(range(0, 32, 2)), (10, 20, 64, 85))
        if name == "raw":
            assert out.shape == (16, 128, 170, 3)
        elif name != "probe":
            assert out.shape == (3, 16, 112, 112) and out.dtype == torch.uint8, name
    assert fns["probe"](path, None, None) == (128, 170)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)
    torch_crop = {box: fns["train-torch"](path, list(range(0, 32, 2)), box).float()
                  for box in ((10, 20, 64, 85), (10, 24, 64, 85), (14, 20, 64, 85))}  # the box, moved 4 px
    for name in ("train-decoder", "pyav-decoder"):  # the same region: luma within a few levels (measured 4.0)
        out = fns[name](path, list(range(0, 32, 2)), (10, 20, 64, 85)).float()
        diff = [float(((out - x) * luma).sum(0).abs().mean()) for x in torch_crop.values()]  # moved: measured 33
        assert diff[0] < 8 and diff[0] * 4 < min(diff[1:]), (name, diff)
