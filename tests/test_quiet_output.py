"""What a user sees: a job prints the project's own lines and nothing from Ray's, DeepSpeed's,
transformers' or diffusers' internals unless --verbose (NOTES.md, "Output filtering"). The
filters themselves are checked here too, fast; the integration test runs a tiny job end to end
as a user would and reads every line it printed."""

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from contextlib import redirect_stdout

import pytest
from conftest import REPO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray prefixes what a worker printed with the worker's name and pid, and its node's ip when
# that is another node: "(RayTrainWorker pid=123) [train] step 1/2 ...".
WORKER = re.compile(r"^\((?:\w+ )?pid=\d+(?:, ip=[\w.:]+)?\) ")
# Every form of line the project prints: the progress lines, each with its stage's prefix, and
# the lines of the multi-line summaries (pogdiff_dist/train/driver.py, evaluation/evaluate.py).
PROGRESS = re.compile(r"^\[(prepare|train|evaluate|tune|budget)\] ")
NUM = r"(-?\d+\.\d+|n/a)"
SUMMARY = [re.compile(p) for p in (
    r"^$",  # the blank line before a summary
    (r"^  (model \(diffusers, safetensors\)|sample grid|metrics|local copy of the run folder|checkpoints"
     r"|MLflow model): +\S"),
    r"^  MLflow run [0-9a-f]+ in experiment '[^']*':$",
    r"^    (mlflow ui --backend-store-uri \S+, then )?https?://\S+$",  # the run's MLflow page
    # the evaluation: its settings, the averages with what they were computed with, the bleed report
    r"^  settings: \d+ images/identity, DDIM \d+, .+$",
    (rf"^    (fid|dino|grecall|accuracy|bleed) +all +{NUM} +majority +{NUM} +few-shot +{NUM}"
     r"( +\[[^]]+\])?( +\(mean top-bleed share\))?$"),
    r"^  identity bleed: who each prompt is judged to be +\[[^]]+\]$",
    r"^    identity +train +judged right +top bleed target +share$",
    r"^    (\* )?\S.*? +\d+ +\d+/\d+ \d\.\d\d( +\S.*?(\s+\d+/\d+ \d\.\d\d)?)?$",  # one identity's row
    r"^    \(\* few-shot; share: of the identity's generated images\)$",
    r"^  most bleed \(prompted -> judged\):$",
    r"^    \S.* -> \S.* +\d+/\d+ \d\.\d\d( +\(its real held-out images judged so: \d+/\d+\))?$",
    r"^  (judged most often for other prompts: .+|no bleed: no image was judged to be another identity)$",
    r"^  (metrics|plot|bleed|grids|images): +\S+$",
    r"^  MLflow run [0-9a-f]+: \d+ eval/\* metrics and artifacts under eval/$",
    # the budget advice after a run whose majority identities are not learned yet
    (r"^  (Each of their images was seen about \d+ times|About \d+ steps would give that here|"
     r"That many exposures have been given|data\.sampling=\w+ shows the majority's images).*$"),
)]


def foreign_lines(output: str) -> list[str]:
    """The lines of ``output`` that are not the project's: a progress line (also as a Ray worker
    printed it) or a line of one of its summaries."""
    bad = []
    for raw in output.splitlines():
        line = ANSI.sub("", raw)
        in_worker = WORKER.match(line)
        if in_worker:  # workers print progress lines only
            ok = PROGRESS.match(line[in_worker.end():])
        else:
            ok = PROGRESS.match(line) or any(p.match(line) for p in SUMMARY)
        if not ok:
            bad.append(raw)
    return bad


def test_the_allowed_forms_are_exactly_the_projects():
    ours = ("[prepare] done in 3.0s: 32 samples\n(RayTrainWorker pid=81) [train] step 1/2 (50%) loss 1.0\n"
            "\n[train] done in 9s\n  model (diffusers, safetensors): /r/model\n  MLflow run 4f0a in experiment "
            "'pogdiff':\n    mlflow ui --backend-store-uri sqlite:////r/m.db, then http://127.0.0.1:5000/#/x\n"
            "    fid       all  0.723   majority  0.685   few-shot  0.762\n  grids:      /r/eval/grids\n"
            "  settings: 16 images/identity, DDIM 25, guidance 3, seed 0, judge digits-cnn, encoder pixels; from x\n"
            "    accuracy  all  0.412   majority  0.375   few-shot  0.429   [16 images/identity, DDIM 25, judge cnn]\n"
            "    bleed     all  0.212   majority  0.208   few-shot  0.214   [16 images/identity]  (mean top-bleed share)\n"
            "  identity bleed: who each prompt is judged to be  [16 images/identity, DDIM 25]\n"
            "    identity           train  judged right   top bleed target               share\n"
            "    Alice Moreau          30     6/16 0.38   Jonas Weber                4/16 0.25\n"
            "    * Farid Haddad         2     5/16 0.31   Jonas Weber (+1 tied)      5/16 0.31\n"
            "    Nils Arendt           30    16/16 1.00   -\n"
            "    (* few-shot; share: of the identity's generated images)\n  most bleed (prompted -> judged):\n"
            "    Farid Haddad -> Jonas Weber        5/16 0.31   (its real held-out images judged so: 0/20)\n"
            "  judged most often for other prompts: Jonas Weber (19 images from 7 identities)\n"
            "  bleed:      /r/eval/identity_confusion.png\n"
            "[budget] the majority identities are not learned yet: validation identity accuracy 0.50 < 0.8 at step 300.\n"
            "  Each of their images was seen about 16 times (data.sampling=balanced); in the learning curves x\n")
    assert foreign_lines(ours) == []
    theirs = ["(PlacementGroupCleaner pid=9) Failed to query Ray Train Controller actor state.",
              "(raylet) WARNING: 8 PYTHON worker processes have been started on node: abc",
              "[2026-12-07 15:43:30,083 E 10189 10189] core_worker.cc:2465: Actor with class name: 'A'",
              "[2026-12-07 15:43:02,143] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
              "(RayTrainWorker pid=8) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
              "Loading weights: 100%|██████████| 196/196", "(RayTrainWorker pid=8)   warnings.warn(",
              "  warnings.warn("]
    assert foreign_lines("\n".join(theirs)) == theirs


def test_harmless_log_records_go_and_the_loggers_other_records_stay():
    from pogdiff_dist.output import drop_harmless_logs

    stream = io.StringIO()
    logger = logging.getLogger("pogdiff_test_quiet")
    logger.addHandler(logging.StreamHandler(stream))
    logger.propagate = False
    logs = [("pogdiff_test_quiet", r"^harmless notice"), ("pogdiff_test_quiet", r"also harmless")]
    drop_harmless_logs(logs)
    drop_harmless_logs(logs)  # again (every quiet_libraries call): replaces, never stacks
    for message in ("harmless notice about %s", "a real warning about %s", "this %s is also harmless"):
        logger.warning(message, "x")
    assert stream.getvalue() == "a real warning about x\n"
    assert len(logger.filters) == 1


def test_a_librarys_harmless_print_goes_and_every_other_print_stays_in_order():
    from pogdiff_dist.output import without_harmless_prints

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(RuntimeError), without_harmless_prints(verbose=False):
        print("before")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("after")
        raise RuntimeError("held lines are written also when the call fails")
    assert out.getvalue() == "before\nafter\n"
    out = io.StringIO()
    with redirect_stdout(out), without_harmless_prints(verbose=True):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert "built successfully" in out.getvalue()  # --verbose shows it


def test_deepspeed_is_imported_without_its_accelerator_guess(capfd):
    """On a machine without CUDA DeepSpeed is told the CPU when imported (no "Setting
    accelerator to CPU" warning), and the setting does not stay in the environment."""
    code = ("import os, torch; import pogdiff_dist.train.engine; from deepspeed.accelerator import get_accelerator; "
            "print(get_accelerator()._name, torch.cuda.is_available(), os.environ.get('DS_ACCELERATOR'))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    name, cuda, env_after = out.stdout.split()
    assert env_after == "None"
    if cuda == "False":
        assert name == "cpu" and "Setting accelerator" not in out.stdout + out.stderr


def test_known_harmless_warnings_are_ignored_once_quiet():
    from pogdiff_dist.output import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries(verbose=False)
        warnings.warn("`torch_dtype` is deprecated and will be removed in version 1.0.0.", FutureWarning)
        warnings.warn("a warning nobody checked", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning nobody checked"]


@pytest.mark.integration
def test_a_tiny_training_with_evaluation_prints_only_the_projects_lines(tmp_path):
    """``python jobs/train.py configs/tiny.yaml --evaluate`` as a user runs it (its own local
    Ray cluster, outputs under tmp_path): every line on stdout and stderr is one of the
    project's, and there are few of them."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "POGDIFF_VERBOSE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "jobs/train.py", "configs/tiny.yaml", "--evaluate",
           "--set", f"prepare.out_dir={tmp_path / 'prepared'}", "--set", f"train.storage_path={tmp_path / 'runs'}",
           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "--set", "optim.max_steps=2", "--set", "train.sample_steps=2",
           "--set", "eval.num_images=2", "--set", "eval.steps=2"]
    out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1500, check=False)
    printed = out.stdout
    assert out.returncode == 0, printed[-5000:]
    for stage in ("[prepare] done in", "[train] done in", "[evaluate] done in"):
        assert stage in printed, printed[-5000:]
    assert foreign_lines(printed) == [], printed
    assert len(printed.splitlines()) <= 60, printed
