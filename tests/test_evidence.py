"""benchmarks/gpu_evidence.sh, the one-command GPU evidence run: its plumbing at tiny sizes on the CPU (every
stage, in about a minute of CPU time), and the summary it builds from the stages' files."""

import json
import os
import subprocess
import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import evidence_summary  # noqa: E402

STAGES = ["env", "correctness", "worksheet", "benchmarks", "profile_b128", "profile_b512"]


def evidence(out, *args, **env):
    return subprocess.run(["bash", "benchmarks/gpu_evidence.sh", str(out), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "EVIDENCE_SMOKE": "1", "PYTHON": sys.executable,
                                                       "GPU_CHECK_ASSETS": str(out / "no-assets"), **env})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    result = evidence(out, EVIDENCE_RETURN=str(out / "return"), EVIDENCE_COMMIT="abc1234")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), result.stdout


def test_the_smoke_run_passes_every_stage_and_writes_the_summary(smoke):
    out, summary, stdout = smoke
    stages = summary["stages"]
    assert all(stages[name]["status"] == "ok" for name in STAGES), stages
    fast = [name for name in stages if name.startswith("fast")]  # one process with --seeds, else one per seed
    assert fast and all(stages[n]["status"] in ("ok", "missing") for n in fast), stages
    assert summary["smoke"] and summary["env"]["torch"] and summary["flops"]["forward_backward_flops"] == 3328997376
    assert summary["correctness"]["failed"] == 0 and summary["correctness"]["passed"] + summary["correctness"][
        "skipped"] >= 5  # the CUDA-only tests: skipped here, run on a GPU
    assert summary["train"]["worksheet"]["epochs_done"] == 2
    seeds = summary["train"]["fast"]["seeds"]
    assert sorted(seeds) == ["seed-0", "seed-1", "seed-2"] and summary["train"]["fast"]["best_tta"]["n"] == 3
    assert any(name.startswith("test_step[eager") for name in summary["benchmarks"])
    for batch in (128, 512):
        assert summary["profiles"][f"profile-b{batch}"]["steps"] == 2
        assert (out / f"profile-b{batch}" / "profile" / "profile.txt").exists()
    assert not list(out.rglob("*.pt"))  # checkpoints are dropped: what comes back from a GPU machine is small
    md = (out / "summary.md").read_text()
    assert "| claim | measured | verdict |" in md and "SMOKE" in md and md in stdout
    for claim in summary["claims"]:
        assert f"| {claim['claim']} | {claim['measured']} | {claim['verdict']} |" in md


def test_what_comes_back_is_six_small_files_and_the_run_is_tied_to_its_sources(smoke):
    """EVIDENCE_RETURN: a machine that brings back 8 files of 16 MiB from one folder gets everything but the
    checkpoints in six; a copied tree without .git still records its commit (given) and its sources' hash."""
    import tarfile

    out, summary, _ = smoke
    back = out / "return"
    assert sorted(p.name for p in back.iterdir()) == ["evidence.tgz", "gpu_evidence.log", "profile-b128.tgz",
                                                      "profile-b512.tgz", "summary.json", "summary.md"]
    assert all(p.stat().st_size < 16 * 2**20 for p in back.iterdir())
    assert (back / "summary.md").read_text() == (out / "summary.md").read_text()
    with tarfile.open(back / "evidence.tgz") as tar:
        names = tar.getnames()
    assert "./run-worksheet/metrics.jsonl" in names and "./env.json" in names
    assert not [n for n in names if n.endswith(".pt") or "profile-b" in n or n.startswith("./return")]
    with tarfile.open(back / "profile-b512.tgz") as tar:
        assert "profile-b512/profile/profile.txt" in tar.getnames()
    assert summary["env"]["commit"] == "abc1234" and summary["commit"] == "abc1234"
    assert summary["env"]["source_sha256"] == evidence_summary.source_sha256(str(REPO))


def test_the_source_hash_follows_the_sources(tmp_path):
    for d in ("fastcifar", "benchmarks"):
        (tmp_path / d).mkdir()
    (tmp_path / "fastcifar" / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "b.sh").write_text("true\n")
    (tmp_path / "fastcifar" / "notes.txt").write_text("not a source")
    first = evidence_summary.source_sha256(str(tmp_path))
    (tmp_path / "fastcifar" / "notes.txt").write_text("changed, still not a source")
    assert evidence_summary.source_sha256(str(tmp_path)) == first
    (tmp_path / "fastcifar" / "a.py").write_text("x = 2\n")
    assert evidence_summary.source_sha256(str(tmp_path)) != first


def _summary(env: dict, stages: dict, correctness: dict | None) -> dict:
    return {"env": env, "device": env.get("gpu"), "stages": stages, "correctness": correctness, "train": {},
            "benchmarks": {}, "profiles": {}}


def test_on_a_gpu_a_skipped_correctness_test_is_incomplete_and_a_missing_dali_says_why():
    """DALI's CUDA-only tests skip where DALI does not import: on a GPU that is a missing answer, not a pass; the
    DALI rows say which of the reasons it was."""
    passed = {"passed": 3, "failed": 0, "error": 0, "skipped": 2}
    gpu = {"gpu": "NVIDIA H200", "dali": None}
    rows = {c: (m, v) for c, m, v in evidence_summary.claims(_summary(gpu, {}, passed))}
    assert rows["CUDA-only correctness tests pass"][1].startswith("incomplete: 2 skipped")
    dali = rows["DALI epoch within 3 % of the torch loader's at batch 128"]
    assert dali == ("not measured: DALI is not installed on this machine (its parts were not carried: "
                    "benchmarks/README.md)", "—")
    failed_import = {"dali_import": {"status": "failed (exit 1)", "seconds": 2}}
    rows = {c: m for c, m, v in evidence_summary.claims(_summary(gpu, failed_import, passed))}
    assert "DALI did not import after its set-up" in rows["DALI epoch within 3 % of the torch loader's at batch 512"]
    cpu = {c: v for c, m, v in evidence_summary.claims(_summary({"gpu": None, "dali": "2.4.0"}, {}, passed))}
    assert cpu["CUDA-only correctness tests pass"] == "pass"  # on a CPU they skip by design
    all_ran = {**passed, "passed": 5, "skipped": 0}
    assert {c: v for c, m, v in evidence_summary.claims(_summary(gpu, {}, all_ran))}[
        "CUDA-only correctness tests pass"] == "pass"


def test_a_return_folder_that_is_the_output_folder_is_refused(tmp_path):
    result = evidence(tmp_path / "out", EVIDENCE_RETURN=str(tmp_path / "out"))
    assert result.returncode == 2 and "EVIDENCE_RETURN must be another folder than OUT_DIR" in result.stderr


def test_an_unknown_stage_is_one_error(tmp_path):
    result = evidence(tmp_path, "--from", "everything")
    assert result.returncode == 2 and "unknown stage everything" in result.stderr


def test_the_summary_judges_each_claim_from_the_files(tmp_path):
    """Made-up stage files (the numbers are not measurements): the verdicts follow the targets, and a stage that
    has not run yet is "not run", not an error."""
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}))
    empty = evidence_summary.summarise(tmp_path)
    assert {c["measured"] for c in empty["claims"][:4]} == {"not run"}
    records = [("test_epoch[batch128-torch]", 0.90), ("test_epoch[batch128-dali]", 0.95),
               ("test_epoch[batch512-torch]", 0.52), ("test_epoch[batch512-dali]", 0.50)]
    (tmp_path / "benchmarks.jsonl").write_text("".join(
        json.dumps({"name": name, "extra_info": {"seconds_median": s}}) + "\n" for name, s in records))
    for seed, accs in enumerate([[0.93, 0.941], [0.935, 0.945], [0.92, 0.939]]):
        run = tmp_path / "run-fast" / f"seed-{seed}"
        run.mkdir(parents=True)
        rows = [{"epoch": e, "test_acc": a - 0.002, "test_acc_tta": a, "train_loss": 1.0, "train_acc": 0.9,
                 "epoch_time_s": 1.0, "train_time_s": 0.9, "elapsed_s": e + 1.0, "elapsed_train_s": e + 0.9,
                 "train_images_per_s": 5e4} for e, a in enumerate(accs)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"headline": "flip TTA", "finished": True}))
    claims = {c["claim"]: c for c in evidence_summary.summarise(tmp_path)["claims"]}
    fast = claims["fast recipe: 94 % test accuracy (flip TTA), mean of 3 seeds, in ≤ 15 epochs"]
    assert fast["verdict"] == "met" and "mean 94.17 %" in fast["measured"]  # (0.941 + 0.945 + 0.939) / 3
    assert "seed-2 93.90 % (93.70 % no TTA; 94 % not reached)" in fast["measured"]
    assert "seed-0 94.10 % (93.90 % no TTA; 94 % at epoch 1, 1.90 s of training)" in fast["measured"]
    assert claims["training epoch at batch 128 ≤ 1.0 s (steady)"]["verdict"] == "met"
    assert claims["training epoch at batch 512 ≤ 0.5 s (steady)"]["verdict"] == "met"
    assert claims["DALI epoch within 3 % of the torch loader's at batch 128"]["verdict"] == "missed"  # 0.95 / 0.90
    assert claims["DALI epoch within 3 % of the torch loader's at batch 512"]["verdict"] == "met"
