"""The speed work keeps the mathematics: the optimised convolution against plain XLA, forward and
gradient; the scanned training step against the unrolled one; the benchmark's helpers."""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import run as bench_run
from benchmarks.measure import MALLOC
from stepjax import parallel
from stepjax.layers import conv2d
from stepjax.models import FAST_COMPILE, make_model


def _reference(x, w, stride):
    p = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    "k, stride, size, cin, cout",
    [(3, 1, 8, 4, 5), (3, 2, 8, 4, 6), (3, 2, 7, 3, 2), (7, 1, 9, 2, 1), (5, 2, 10, 3, 4), (1, 2, 6, 3, 4), (1, 1, 5, 2, 3)],
)
def test_conv2d_matches_lax_conv_forward_and_gradient(k, stride, size, cin, cout):
    kx, kw, ky = jax.random.split(jax.random.key(k * 100 + stride * 10 + size), 3)
    x = jax.random.normal(kx, (2, size, size, cin))
    w = jax.random.normal(kw, (k, k, cin, cout))
    y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, stride), x, w)
    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, stride), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(ky, y.shape)
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_conv2d_gradient_inside_scan_and_jit():
    """The custom gradient under `scan` (where XLA's own one was slow) and `jit` matches XLA's."""
    xs = jax.random.normal(jax.random.key(0), (3, 3, 3, 4, 4))
    x0 = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))

    def run(conv):
        def loss(ws, x):
            def body(x, w):
                return jnp.tanh(x + conv(x, w)), None

            return jax.lax.scan(body, x, ws)[0].sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(xs * 0.3, x0)

    got, want = run(lambda x, w: conv2d(x, w, 1)), run(lambda x, w: _reference(x, w, 1))
    for g, g_ref in zip(got, want):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("controller", ["constant", "cbam"])
def test_scanned_model_gradient_matches_python_loop(controller):
    """Same losses and gradients with the stage as one scan (fast path) and as a Python loop."""
    kwargs = dict(num_classes=3, controller=controller, depths=(3, 2, 2), widths=(2, 4, 4), stem_width=4)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))

    def value_and_grads(scan):
        graphdef, params, rest = nnx.split(make_model("resnet164", scan=scan, **kwargs), nnx.Param, ...)

        def loss(params):
            return (nnx.merge(graphdef, params, rest, copy=True)(x) ** 2).mean()

        return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)  # compiles in less time

    (l1, g1), (l2, g2) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("controller", ["stepnet", "dia"])
def test_recomputation_in_scan_keeps_gradients_and_statistics(monkeypatch, controller):
    """Storing only the larger kernels' convolution outputs (STEPJAX_REMAT, default on) changes nothing computed."""
    kwargs = dict(num_classes=3, controller=controller, depths=(3, 2, 2), widths=(2, 4, 4), stem_width=4)
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))

    def run(remat):
        monkeypatch.setenv("STEPJAX_REMAT", remat)
        graphdef, params, rest = nnx.split(make_model("resnet164", **kwargs), nnx.Param, ...)

        def loss(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            return (model(x) ** 2).mean(), nnx.state(model, nnx.Not(nnx.Param))

        return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)

    ((l1, s1), g1), ((l2, s2), g2) = run("1"), run("0")
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_scanned_stage_stores_the_outputs_of_larger_kernels_and_redoes_1x1(capsys):
    """The policy of `EulerStage`'s checkpoint keeps what `conv2d` names: a 3x3 convolution's output,
    not a 1x1's (one matrix product, redone in the backward pass)."""
    from jax.ad_checkpoint import print_saved_residuals

    from stepjax.ode.euler import SAVED

    x, w3, w1 = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((1, 1, 5, 7))
    f = jax.checkpoint(lambda x, w3, w1: jnp.tanh(conv2d(jnp.tanh(conv2d(x, w3)), w1)).sum(),
                       policy=jax.checkpoint_policies.save_only_these_names(SAVED))
    print_saved_residuals(f, x, w3, w1)
    saved = [line for line in capsys.readouterr().out.splitlines() if SAVED in line]
    assert len(saved) == 1 and saved[0].startswith("f32[2,8,8,5]")  # the 3x3 output; the 1x1's is f32[2,8,8,7]


def _fake_results():
    return [
        {"name": "resnet164/resnet", "compile_s": 10.0, "step_s": 2.0, "images_per_s": 64.0, "step_peak_rss_gib": 2.0,
         "peak_rss_gib": 3.0, "devices": 2, "load": [1, 1, 1]},
        {"name": "resnet164/se", "compile_s": 11.0, "step_s": 2.2, "images_per_s": 58.0, "step_peak_rss_gib": 2.0,
         "peak_rss_gib": 3.0, "devices": 2, "load": [1, 1, 1]},
        *({"name": f"{preset}/resnet (compile, round {i + 1})", "compile_s": t, "devices": 2, "load": [1, 1, 1]}
          for i, times in enumerate([(10.0, 8.0, 8.8), (15.0, 8.0, 8.0), (9.0, 10.0, 9.0)])
          for preset, t in zip(("resnet164", "resnet56", "resnet110"), times)),
        {"name": "pytorch resnet164", "step_s": 2.5, "step_peak_rss_gib": 2.5, "peak_rss_gib": 2.6},
        {"name": "input pipeline", "loader_images_per_s": 9000.0, "loader_augment_images_per_s": 5000.0,
         "devices": 2, "load": [1, 1, 1]},
        {"name": "resnet164/dia", "error": "boom"},
    ]


def test_a_record_from_before_the_compile_rounds_keeps_its_compile_ratio():
    """`--markdown` rewrites a results block from any saved record: one compile each, ResNet-164's
    the plain step's own."""
    from benchmarks.report import summarise

    old = [r for r in _fake_results() if "(compile" not in r["name"]]
    old += [{"name": "resnet56/resnet (compile)", "compile_s": 8.0}, {"name": "resnet110/resnet (compile)", "compile_s": 8.8}]
    s = summarise(old)
    assert s["compile_ratio_164_vs_56"] == pytest.approx(1.25) and "compile_ratio_164_vs_56" not in s["rounds_range"]


def test_benchmark_summary_and_table():
    from benchmarks.report import summarise, table

    results = _fake_results()
    s = summarise(results)
    assert s["step_ratio_se_vs_plain"] == pytest.approx(1.1)
    # compiles round by round, in turn: the medians' ratio, and beside it the rounds' own
    assert s["compile_resnet164_s"] == 10.0
    assert s["compile_ratio_164_vs_56"] == pytest.approx(10.0 / 8.0)
    assert s["rounds_range"]["compile_ratio_164_vs_56"] == pytest.approx([0.9, 1.875])
    assert s["rounds_median"]["compile_ratio_164_vs_56"] == pytest.approx(1.25)
    assert s["compile_ratio_110_vs_56"] == pytest.approx(8.8 / 8.0)
    assert s["speed_ratio_jax_vs_torch"] == pytest.approx(1.25)
    assert s["targets_met"] == {
        "resnet164 step >= pytorch": True, "se step <= 1.15x plain": True,
        "compile 164 <= 1.5x 56 and < 30 s": True, "pipeline >= 3x step": True, "peak memory <= pytorch": True,
    }
    text = table(results)
    assert "resnet164/se" in text and "error: boom" in text


def test_same_time_ratios_of_the_interleaved_run():
    from benchmarks.report import summarise

    steps = {"resnet164/resnet": 4.0, "resnet164/se": 4.4, "resnet164/resnet (1 device)": 3.2,
             "resnet20/resnet (cpu protocol)": 0.1, "resnet20/resnet (cpu protocol) (1 device)": 0.125,
             "pytorch resnet164": 3.6}
    times = {"resnet164/resnet": [4.0, 5.0, 3.0], "pytorch resnet164": [3.6, 4.0, 3.3], "resnet164/se": [4.4, 5.5]}
    s = summarise([{"name": "interleaved", "step_s": steps, "step_times_s": times, "devices": 2, "batch": {},
                    "load": [[1, 1, 1]]}])
    assert s["step_ratio_se_vs_plain"] == pytest.approx(1.1)
    assert s["speed_ratio_jax_vs_torch"] == pytest.approx(0.9)
    assert s["speed_ratio_one_device_vs_per_core"] == pytest.approx(1.25)
    assert s["speed_ratio_resnet20_one_device_vs_per_core"] == pytest.approx(0.8)
    # each round's ratio, paired by round: PyTorch / JAX 0.9, 0.8, 1.1
    assert s["rounds_range"]["speed_ratio_jax_vs_torch"] == pytest.approx([0.8, 1.1])
    assert s["rounds_range"]["step_ratio_se_vs_plain"] == pytest.approx([1.1, 1.1])
    assert "speed_ratio_one_device_vs_per_core" not in s["rounds_range"]  # no per-round times given


def test_the_rounds_own_ratios_are_paired_by_round():
    from benchmarks.report import markdown, summarise

    # the load drifts: round 2 is slow for plain's timed step only; paired by round SE costs 1.1x
    times = {"resnet164/resnet": [1.0, 2.0, 4.0], "resnet164/se": [1.1, 3.0, 4.4]}
    steps = {k: sorted(v)[1] for k, v in times.items()}
    s = summarise([{"name": "interleaved", "step_s": steps, "step_times_s": times, "devices": 2, "batch": {},
                    "load": [[1, 1, 1]]}])
    assert s["step_ratio_se_vs_plain"] == pytest.approx(1.5)  # the medians' ratio
    assert s["rounds_median"]["step_ratio_se_vs_plain"] == pytest.approx(1.1)
    out = {"environment": {"cpu": "x", "cores": 2, "python": "3", "jax": "j", "jaxlib": "j", "flax": "f",
                           "optax": "o", "grain": "g", "torch": None, "date": "d"}, "results": [], "summary": s,
           "total_wall_s": 1.0}
    assert "| SE step <= 1.15x plain | 1.50x plain (rounds 1.10-1.50, their median 1.10) | MISSED |".lower() \
        in markdown(out).lower()


def test_benchmark_results_replace_only_the_marked_block(tmp_path):
    from benchmarks.report import MARKERS, environment, summarise, write_docs

    BEGIN, END = MARKERS[False]
    results = _fake_results()
    out = {"environment": environment(), "results": results, "summary": summarise(results), "total_wall_s": 60.0}
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"intro\n{BEGIN}\nold figures\n{END}\nprose after\n")
    write_docs(out, doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("prose after\n") and "old figures" not in text
    assert "| resnet164 step >= pytorch | 1.25x PyTorch's speed | met |" in text
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no <!-- bench:results -->"):
        write_docs(out, doc)


def test_gpu_results_merge_and_fill_their_own_block(tmp_path):
    from benchmarks.report import MARKERS, merge, write_docs

    env = {"cpu": "x", "cores": 16, "python": "3.12", "jax": "j", "jaxlib": "j", "flax": "f", "optax": "o",
           "grain": "g", "date": "d"}
    row = {"name": "gpu resnet/float32/b128", "device_kind": "NVIDIA H200", "compile_s": 12.0, "step_s": 0.025,
           "images_per_s": 5120.0, "eval_images_per_s": 48000.0, "mfu": 0.016,
           "memory_stats": {"peak_bytes_in_use": 2 * 2**30}, "paper_epoch_s": 9.9}
    first = {"environment": env, "gpu": True, "total_wall_s": 60.0, "results": [row]}
    second = {**first, "results": [{"name": "gpu se/float32/b128", "error": "boom"}]}
    out = merge([first, second])
    assert [r["name"] for r in out["results"]] == ["gpu resnet/float32/b128", "gpu se/float32/b128"]
    assert out["total_wall_s"] == 120.0
    begin, end = MARKERS[True]
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"{MARKERS[False][0]}\ncpu\n{MARKERS[False][1]}\n{begin}\n{end}\n")
    write_docs(out, doc)
    text = doc.read_text()
    assert "\ncpu\n" in text and "| gpu resnet/float32/b128 | NVIDIA H200 | 12.0 | 25.0 | 5120 | 48000 | 1.6 % | 2.00 | 9.9 |" in text
    assert "error: boom" in text
    with pytest.raises(SystemExit, match="cannot merge CPU and GPU"):
        merge([first, {**first, "gpu": False}])


def test_jaxpr_flops_count_convolutions_matmuls_and_scan_bodies():
    from benchmarks.flops import jaxpr_flops

    x, w = jnp.zeros((2, 8, 8, 16)), jnp.zeros((3, 3, 16, 32))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert jaxpr_flops(jax.make_jaxpr(conv)(x, w).jaxpr) == 2 * (2 * 4 * 4 * 32) * (3 * 3 * 16)
    power = lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, length=5)[0]
    assert jaxpr_flops(jax.make_jaxpr(jax.jit(power))(jnp.zeros((4, 6, 6))).jaxpr) == 5 * 2 * 4 * 6 * 6 * 6


def test_gpu_worker_runs_on_any_backend_and_counts_model_flops(tmp_path):
    from benchmarks.workers import worker_gpu

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        np.savez(tmp_path / f"{split}.npz", image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 label=rng.integers(0, 10, n, dtype=np.uint8))
    spec = {"exp": "cifar10_se", "data_dir": str(tmp_path), "dtype": "float32", "warmup": 1, "repeats": 2,
            "eval_repeats": 1, "overrides": ["model.depths=(2,2,2)", "model.widths=(4,4,4)", "model.stem_width=4",
                                              "train.global_batch=8", "train.eval_batch=16"]}
    result = worker_gpu(spec)
    assert result["device_kind"] == jax.devices()[0].device_kind
    assert result["model_flops_per_step"] > 0 and result["step_s"] > 0
    assert result["paper_epoch_s"] == pytest.approx(50_000 // 8 * result["step_s"] + 10_000 / result["eval_images_per_s"])


# large blocks malloc'd, written and freed by a thread, as XLA:CPU's worker threads do at every step
_THREAD_FAULTS = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def work():
    for _ in range(3):
        block = libc.malloc(128 << 20)
        ctypes.memset(block, 1, 128 << 20)
        libc.free(ctypes.c_void_p(block))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thread_faults(tunables):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | tunables
    return int(subprocess.run([sys.executable, "-c", _THREAD_FAULTS], env=env, capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.skipif(parallel.thp_setting() != "madvise", reason="huge pages come on request only in madvise mode")
def test_the_huge_pages_tunable_takes_the_page_faults_out_of_large_thread_blocks():
    assert MALLOC["GLIBC_TUNABLES"] == parallel.HUGE_PAGES_TUNABLE  # benchmarks run what training runs
    plain = _thread_faults({})
    huge = _thread_faults({"GLIBC_TUNABLES": parallel.HUGE_PAGES_TUNABLE})
    assert plain > 3 * 32768 * 0.9  # every 4 KiB page of every block faulted in again
    assert huge < plain / 20


def test_host_pages_names_the_pages_and_the_fix(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(parallel, "_THP_SETTING", str(setting))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    setting.write_text("always [madvise] never\n")
    assert parallel.host_pages().startswith(f"4 KiB pages: GLIBC_TUNABLES={parallel.HUGE_PAGES_TUNABLE} when")
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{parallel.HUGE_PAGES_TUNABLE}")
    assert parallel.host_pages() == f"huge pages ({parallel.HUGE_PAGES_TUNABLE}; transparent huge pages: madvise)"
    setting.write_text("always madvise [never]\n")
    assert parallel.host_pages().startswith("4 KiB pages: this kernel's transparent huge pages are off")
    monkeypatch.delenv("GLIBC_TUNABLES")
    setting.write_text("[always] madvise never\n")
    assert parallel.host_pages() == "huge pages (transparent huge pages: always)"
    setting.unlink()
    assert parallel.thp_setting() == "unknown"


def _restart_conditions(monkeypatch, tmp_path, setting="always [madvise] never"):
    (tmp_path / "enabled").write_text(setting + "\n")
    monkeypatch.setattr(parallel, "_THP_SETTING", str(tmp_path / "enabled"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(parallel.HUGE_PAGES_ENV, raising=False)
    calls = []
    monkeypatch.setattr(parallel.os, "execv", lambda path, argv: calls.append((path, argv, os.environ["GLIBC_TUNABLES"])))
    return calls


def test_command_line_tools_restart_with_huge_pages_only_where_it_helps(monkeypatch, tmp_path):
    calls = _restart_conditions(monkeypatch, tmp_path)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    parallel.restart_with_huge_pages()
    assert calls == [(sys.executable, [sys.executable, *sys.orig_argv[1:]], f"glibc.malloc.arena_max=2:{parallel.HUGE_PAGES_TUNABLE}")]
    for tunables in (parallel.HUGE_PAGES_TUNABLE, "glibc.malloc.hugetlb=0"):  # already decided: left alone
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
        parallel.restart_with_huge_pages()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(parallel.HUGE_PAGES_ENV, "0")
    parallel.restart_with_huge_pages()
    assert len(calls) == 1
    for setting in ("[always] madvise never", "always madvise [never]"):
        calls = _restart_conditions(monkeypatch, tmp_path, setting)
        parallel.restart_with_huge_pages()
        assert calls == []


@pytest.mark.skipif(parallel.thp_setting() != "madvise" or parallel.glibc_version() < (2, 35),
                    reason="restarts only where the kernel gives huge pages on request and glibc has the tunable")
def test_a_restarted_command_runs_again_with_huge_pages():
    script = ("import os; from stepjax import parallel; print('started', os.environ.get('GLIBC_TUNABLES'), flush=True); "
              "parallel.restart_with_huge_pages(); print('working with', parallel.host_pages())")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", parallel.HUGE_PAGES_ENV)}
    out = subprocess.run([sys.executable, "-c", script], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == ["started None", f"started {parallel.HUGE_PAGES_TUNABLE}",
                   f"working with huge pages ({parallel.HUGE_PAGES_TUNABLE}; transparent huge pages: madvise)"]


def test_a_partial_benchmark_never_replaces_the_full_record(capsys):
    def out(gpu=False, quick=False, only=None):
        return bench_run.default_out(argparse.Namespace(gpu=gpu, quick=quick, only=only))

    assert out().name == "latest.json" and out(gpu=True).name == "gpu.json"
    assert out(quick=True).name == out(only=["interleaved"]).name == "partial.json"
    full = out()
    before = full.stat().st_mtime_ns if full.exists() else None
    assert bench_run.main(["--only", "nosuch", "--no-torch"]) == 2  # nothing measured, nothing written
    assert "--only nosuch matches no measurement; their names: 'resnet164/resnet'" in capsys.readouterr().err
    assert (full.stat().st_mtime_ns if full.exists() else None) == before
