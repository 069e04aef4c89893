"""The stock ``yolo`` command with DP keys (``ultralytics_dp.integration.plugin``): it trains privately, refuses
before anything is written, fails closed when switched off, leaves non-private runs exactly as
Ultralytics makes them, records truthful arguments, resumes privately, shows epsilon instead of
training statistics, and works after ``pip install .`` and ``pip install -e .``."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
import torch

import ultralytics_dp  # noqa: F401  (registers the plugin before Ultralytics is imported)
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT, entrypoint
from ultralytics.utils import YAML
from ultralytics.utils.callbacks import base

from ultralytics_dp.accounting.ledger import Ledger
from helpers import released_epsilon
from ultralytics_dp.config import SETTINGS
from ultralytics_dp.integration import keys, plugin

from helpers import ledger_steps

REPO = Path(__file__).resolve().parents[1]


def yolo(line: str) -> None:
    """``yolo ...`` through Ultralytics' own entry point, in this process (the plugin is active)."""
    entrypoint(line)


def run_python(code: str, env: dict[str, str] | None = None, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd="/", timeout=900)


def test_pyproject_states_the_window_of_ultralytics_releases_the_plugin_accepts():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    low, high = keys.ULTRALYTICS_WINDOW
    assert f"ultralytics>={low},<={high}" in deps
    assert not [d for d in deps if "==" in d]  # ranges in the metadata; exact versions in constraints.txt
    assert keys.in_window(low) and keys.in_window(high) and not keys.in_window("8.4.186")
    assert not keys.in_window("8.4.191") and not keys.in_window("8.4.190.dev0") and not keys.in_window("9")


def test_every_dp_key_is_an_ultralytics_key_and_unset_ones_stay_out_of_a_trainers_args():
    from ultralytics.engine import trainer

    assert set(SETTINGS) <= set(DEFAULT_CFG_DICT)
    args = trainer.get_cfg(overrides={"epochs": 1})
    assert not set(SETTINGS) & set(vars(args))
    assert trainer.get_cfg(overrides={"epsilon": 3}).epsilon == 3


def test_dp_keys_without_epsilon_or_with_bad_values_are_refused_before_anything_is_written(tiny_det, tmp_path):
    common = f"yolo train model=yolo26n.yaml data={tiny_det} epochs=1 imgsz=64 batch=8 workers=0 project={tmp_path}"
    for extra, match in (("delta=1e-3", "delta=0.001 without epsilon"), ("epsilon=-1", "epsilon must be"),
                         ("epsilon=8 max_grad_norm=abc", "max_grad_norm must be")):
        with pytest.raises(ValueError, match=match) as err:
            yolo(f"{common} name=r {extra}")
        assert len(str(err.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_trainer_with_epsilon_but_no_private_step_is_refused(tiny_det, tmp_path):
    """The check at index 0 of the default callbacks, independent of the wrapped constructor."""
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    assert base.default_callbacks["on_pretrain_routine_start"][0] is plugin.require_private_step_attached
    assert base.default_callbacks["on_train_start"][0] is plugin.require_private_step_installed
    trainer = DetectionTrainer.__new__(DetectionTrainer)
    original_init = BaseTrainer.__init__.__wrapped__  # Ultralytics' own constructor, unwrapped
    with pytest.raises(RuntimeError, match="no private step is attached"):
        original_init(trainer, overrides=dict(model="yolo26n.yaml", data=str(tiny_det), epochs=1, imgsz=64, batch=8,
                                              workers=0, project=str(tmp_path), name="r", epsilon=8, plots=False))
    assert not list(tmp_path.rglob("*.pt")) and getattr(trainer, "optimizer", None) is None  # never got to train


BYPASS = """
import importlib.machinery, sys
import ultralytics_dp

class LoadsTheTrainerFirst:  # another import hook ahead of ours (a type checker's, a profiler's)
    def find_spec(self, name, path, target=None):
        if name.startswith("ultralytics.engine."):
            return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path.insert(0, LoadsTheTrainerFirst())
from ultralytics import YOLO
from ultralytics.engine.trainer import BaseTrainer
assert not getattr(BaseTrainer.__init__, "_ultralytics_dp", False)  # the trainer was not patched
YOLO("yolo26n.yaml").train(data="{data}", epochs=1, imgsz=64, batch=8, workers=0, plots=False,
                           project="{project}", name="r", epsilon=8, delta=1e-3)
"""


def test_a_trainer_loaded_past_the_plugin_refuses_dp_keys_instead_of_training(tiny_det, tmp_path):
    out = run_python(BYPASS.format(data=tiny_det, project=tmp_path))
    assert out.returncode != 0 and "no private step is attached" in out.stderr
    assert not list(tmp_path.rglob("*.pt"))  # refused before training: no checkpoint at all


def test_a_cfg_given_to_the_trainer_cannot_bring_the_ledger_path_into_its_arguments(tiny_det, tmp_path):
    from ultralytics.models.yolo.detect import DetectionTrainer

    ledger = tmp_path / "my-ledger.sqlite"
    cfg = tmp_path / "run.yaml"
    # a copy of Ultralytics' default.yaml (which has no DP keys), with epsilon, delta and the ledger added
    YAML.save(cfg, {**{k: v for k, v in DEFAULT_CFG_DICT.items() if k not in SETTINGS}, "model": "yolo26n.yaml",
                    "data": str(tiny_det), "epochs": 1, "imgsz": 64, "batch": 8, "workers": 0, "plots": False,
                    "project": str(tmp_path), "name": "r", "epsilon": 8, "delta": 1e-3, "ledger": str(ledger)})
    trainer = DetectionTrainer(cfg=str(cfg))
    assert getattr(trainer.args, "ledger", None) is None and trainer.args.epsilon == 8
    assert str(ledger) not in (tmp_path / "r" / "args.yaml").read_text()


def test_the_wrapped_trainer_takes_its_arguments_by_keyword(tiny_det, tmp_path):
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    class KeywordTrainer(DetectionTrainer):  # as a custom trainer, or Ultralytics' multi-GPU launcher, calls it
        def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
            BaseTrainer.__init__(self, cfg=cfg, overrides=overrides, _callbacks=_callbacks)

    overrides = {"model": "yolo26n.yaml", "data": str(tiny_det), "project": str(tmp_path), "name": "r"}
    assert KeywordTrainer(overrides=overrides).args.epochs == DEFAULT_CFG.epochs
    private = KeywordTrainer(overrides={**overrides, "name": "p", "epsilon": 8, "delta": 1e-3})
    assert private.args.epsilon == 8 and private.args.mosaic == 0


def test_resuming_a_hostile_checkpoint_under_safe_load_runs_none_of_its_code(tmp_path):
    from test_checkpoint import hostile_checkpoint

    marker = tmp_path / "ran"
    path = hostile_checkpoint(tmp_path / "last.pt", marker)
    out = run_python(f"import ultralytics_dp\nfrom ultralytics import YOLO\nYOLO('yolo26n.yaml').train(resume={str(path)!r})",
                     env={"ULTRALYTICS_SAFE_LOAD": "1"})
    assert out.returncode != 0  # Ultralytics' safe loader refuses the file
    assert not marker.exists()
    out = run_python(f"import ultralytics_dp\nfrom ultralytics import YOLO\nYOLO('yolo26n.yaml').train(resume={str(path)!r})",
                     env={"ULTRALYTICS_SAFE_LOAD": "1", plugin.ENV: "0"})
    assert out.returncode != 0 and not marker.exists()  # the same as without the plugin


def test_a_trainer_without_dp_keys_loads_none_of_the_dp_engine(tiny_det, tmp_path):
    code = ("import sys, ultralytics_dp\nfrom ultralytics.models.yolo.detect import DetectionTrainer\n"
            f"DetectionTrainer(overrides=dict(model='yolo26n.yaml', data={str(tiny_det)!r}, project={str(tmp_path)!r}))\n"
            "print(sorted(m for m in sys.modules if m.startswith('ultralytics_dp.')"
            " and m.split('.')[1] in ('accounting', 'mechanism', 'losses') or m.endswith('.adapter')))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_plugin_off_leaves_nothing_of_the_package_active():
    code = ("import sys, ultralytics_dp, ultralytics.engine.trainer as t, ultralytics.cfg as c\n"
            "print([type(f).__module__ for f in sys.meta_path if type(f).__module__.startswith('ultralytics_dp')],"
            " getattr(t.check_det_dataset, 'resolves_embedded', False), 'epsilon' in c.DEFAULT_CFG_DICT)")
    assert run_python(code, env={plugin.ENV: "0"}).stdout.split() == ["[]", "False", "False"]
    on = run_python(code).stdout.split()
    assert on[1:3] == ["True", "True"]  # the same check sees the plugin when it is on


def test_plugin_off_rejects_the_dp_keys_and_trains_nothing(tmp_path):
    out = run_python(
        "import ultralytics_dp\nfrom ultralytics.cfg import entrypoint\n"
        f"entrypoint('yolo train model=yolo26n.yaml data=digits-det epochs=1 epsilon=8 project={tmp_path} name=r')",
        env={plugin.ENV: "0"})
    assert out.returncode != 0
    assert "'epsilon' is not a valid YOLO argument" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quiet", [{}, {"YOLO_VERBOSE": "False"}, {"PYTHONWARNINGS": "ignore"}])
def test_another_ultralytics_version_turns_the_keys_off_and_says_why(tmp_path, quiet):
    out = run_python(
        "import ultralytics_dp, ultralytics\nultralytics.__version__ = '0.0.1'\n"
        "from ultralytics.cfg import entrypoint\n"
        f"entrypoint('yolo train model=yolo26n.yaml data=digits-det epochs=1 epsilon=8 project={tmp_path} name=r')",
        env=quiet)
    assert out.returncode != 0
    low, high = keys.ULTRALYTICS_WINDOW
    assert f"supports Ultralytics {low} to {high}, found 0.0.1" in out.stderr  # whatever the verbosity
    assert "'epsilon' is not a valid YOLO argument" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_dp_settings_given_twice_are_refused(tiny_det, tmp_path):
    from ultralytics import YOLO

    from ultralytics_dp import DifferentialPrivacy

    model = YOLO("yolo26n.yaml")
    DifferentialPrivacy(epsilon=4, delta=1e-3, ledger=False).attach(model)
    with pytest.raises(ValueError, match="given both"):
        model.train(data=str(tiny_det), epochs=1, imgsz=64, batch=8, workers=0, project=str(tmp_path), name="r",
                    epsilon=8)
    assert list(tmp_path.iterdir()) == []


def progress_rows(console: str) -> list[list[str]]:
    """The per-step rows of the training progress bar: epoch, memory, epsilon, step, budget, instances, size."""
    rows = []
    for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", console)):
        fields = line.split(":")[0].split()
        if len(fields) == 7 and re.fullmatch(r"\d+/\d+", fields[0]):
            rows.append(fields)
    return rows


@pytest.mark.slow
def test_stock_command_trains_privately_and_records_what_it_used(tiny_det, tmp_path, capfd):
    ledger = tmp_path / "ledger.sqlite"
    yolo(f"yolo train model=yolo26n.yaml data={tiny_det} epochs=2 imgsz=64 batch=8 workers=0 project={tmp_path} "
         f"name=run epsilon=8 delta=1e-3 max_grad_norm=0.5 ledger={ledger}")
    console = capfd.readouterr()
    console = console.out + console.err
    run = tmp_path / "run"
    entry = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert entry["steps"] == 8 and entry["settings"]["max_grad_norm"] == 0.5
    expected = released_epsilon(noise_multiplier=entry["noise_multiplier"], sample_rate=0.25, steps=8, delta=1e-3)
    assert entry["epsilon"] == pytest.approx(expected) and entry["epsilon"] <= 8
    assert ledger_steps(ledger) == 8

    args = YAML.load(run / "args.yaml")  # what was used, DP keys included
    assert (args["epsilon"], args["delta"], args["max_grad_norm"], args["mosaic"], args["close_mosaic"]) == (
        8, 1e-3, 0.5, 0.0, 0)
    assert args["optimizer"] == "SGD" and args["lr0"] != DEFAULT_CFG_DICT["lr0"]  # the DP defaults, lr0 fitted
    assert "ledger" not in args and str(ledger) not in (run / "args.yaml").read_text()  # a local path: never released
    train_args = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["train_args"]
    assert {k: train_args[k] for k in ("epsilon", "mosaic", "lr0")} == {k: args[k] for k in ("epsilon", "mosaic", "lr0")}

    files = {p.name for p in run.iterdir()}
    assert {"privacy.png", "results.png", "confusion_matrix.png"} <= files  # public plots stay on
    assert not [f for f in files if f.startswith("train_batch") or f == "labels.jpg"]
    with open(run / "results.csv") as f:
        header = next(csv.reader(f))
    assert "dp/epsilon" in header and not [c for c in header if c.startswith("train/")]

    # the progress bar shows epsilon, the step and the budget; memory and instance counts stay hidden
    rows = progress_rows(console)
    assert rows and all(r[1] == "0G" and r[5] == "0" for r in rows)
    last = max(rows, key=lambda r: int(r[3]))
    assert int(last[3]) == 8 and int(last[4]) == 8
    assert float(last[2]) == pytest.approx(entry["epsilon"], rel=0.02)
    steps_shown = sorted({int(r[3]) for r in rows})
    assert steps_shown[-4:] == [5, 6, 7, 8]


@pytest.mark.slow
def test_an_explicit_mixing_augmentation_is_refused_before_anything_is_written(tiny_det, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    with pytest.raises(ValueError, match="mosaic=1.0 mixes several images") as err:
        yolo(f"yolo train model=yolo26n.yaml data={tiny_det} epochs=1 imgsz=64 batch=8 workers=0 project={tmp_path} "
             f"name=r epsilon=8 delta=1e-3 mosaic=1.0 ledger={ledger}")
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "r").exists()
    assert ledger_steps(ledger) == 0 and Ledger(ledger).summary()["datasets"] == []  # nothing spent or recorded


PLAIN_RUN = (
    "import ultralytics_dp, torch\nfrom ultralytics.cfg import entrypoint\n"
    "entrypoint('yolo train model=yolo26n.yaml data={data} epochs=1 imgsz=64 batch=8 workers=0 plots=False "
    "project={project} name=run')\n"
    "ckpt = torch.load('{project}/run/weights/last.pt', map_location='cpu', weights_only=False)\n"
    "print('DP-ENTRY', 'dp' in ckpt)\n"
)


@pytest.mark.slow
def test_a_run_without_dp_keys_is_exactly_ultralytics_own(tiny_det, tmp_path):
    outs = {}
    for state in ("1", "0"):
        project = tmp_path / f"plugin{state}"
        out = run_python(PLAIN_RUN.format(data=tiny_det, project=project), env={plugin.ENV: state})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "DP-ENTRY False" in out.stdout and "DP:" not in out.stdout + out.stderr
        args = YAML.load(project / "run" / "args.yaml")
        header = (project / "run" / "results.csv").read_text().splitlines()[0]
        outs[state] = ({k: v for k, v in args.items() if k not in {"project", "save_dir"}}, header)
    assert outs["1"] == outs["0"]
    assert outs["1"][0]["mosaic"] == DEFAULT_CFG_DICT["mosaic"] and "train/box_loss" in outs["1"][1]


@pytest.mark.slow
def test_resume_from_the_stock_command_continues_the_accountant(tiny_det, tmp_path, monkeypatch):
    ledger = tmp_path / "ledger.sqlite"

    def crash_in_epoch_2(trainer):
        if trainer.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setitem(base.default_callbacks, "on_train_epoch_start",
                        [*base.default_callbacks["on_train_epoch_start"], crash_in_epoch_2])
    with pytest.raises(KeyboardInterrupt):
        yolo(f"yolo train model=yolo26n.yaml data={tiny_det} epochs=2 imgsz=64 batch=8 workers=0 plots=False "
             f"project={tmp_path} name=run epsilon=8 delta=1e-3 noise_multiplier=1.0 ledger={ledger}")
    monkeypatch.undo()
    last = tmp_path / "run" / "weights" / "last.pt"
    before = torch.load(last, map_location="cpu", weights_only=False)["dp"]
    assert before["steps"] == 4

    yolo(f"yolo train resume model={last} ledger={ledger}")  # no DP key but the ledger's path (local)
    after = torch.load(last, map_location="cpu", weights_only=False)["dp"]
    assert after["run_id"] == before["run_id"] and after["steps"] == 8
    assert after["epsilon"] == pytest.approx(released_epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=8,
                                                             delta=1e-3))
    assert ledger_steps(ledger) == 8


def _fresh_venv(path: Path) -> Path:
    """A venv whose heavy dependencies come from this environment through a .pth file (pip has
    nothing to download), with Ultralytics' ``yolo`` console script as pip writes it; returns its
    bin dir."""
    venv.create(path, with_pip=True)
    py = path / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)  # older than torch needs
    Path(site, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = path / "bin" / "yolo"  # Ultralytics' entry point: yolo = ultralytics.cfg:entrypoint
    script.write_text(f"#!{py}\nimport sys\nfrom ultralytics.cfg import entrypoint\nsys.exit(entrypoint())\n")
    script.chmod(0o755)
    return path / "bin"


def _trains_privately_with_the_console_script(bin_dir: Path, data: Path, tmp_path: Path, epsilon: float) -> None:
    """``yolo train ... epsilon=`` through the venv's own ``yolo`` script: 4 private steps recorded."""
    out = subprocess.run([bin_dir / "yolo", "train", "model=yolo26n.yaml", f"data={data}", "epochs=1", "imgsz=64",
                          "batch=8", "workers=0", "plots=False", f"project={tmp_path}", "name=run", f"epsilon={epsilon}",
                          "delta=1e-3", f"ledger={tmp_path / 'ledger.sqlite'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    entry = torch.load(tmp_path / "run" / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    assert entry["steps"] == 4 and entry["epsilon"] <= epsilon


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_the_yolo_console_script_trains_privately_after_pip_install(tiny_det, tmp_path, editable):
    bin_dir = _fresh_venv(tmp_path / "venv")
    target = ["-e", str(REPO)] if editable else [str(REPO)]
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-build-isolation", *target], check=True, capture_output=True, cwd=tmp_path)
    _trains_privately_with_the_console_script(bin_dir, tiny_det, tmp_path, epsilon=5)
    if not editable:  # uninstall removes the start-up file; one left behind does nothing
        (pth,) = (tmp_path / "venv").rglob("ultralytics_dp.pth")
        line = pth.read_text()
        subprocess.run([bin_dir / "python", "-m", "pip", "uninstall", "-q", "-y", "ultralytics-dp"], check=True)
        assert not pth.exists()
        pth.write_text(line)
        out = subprocess.run([bin_dir / "python", "-c", "import sys; print('ultralytics_dp' in sys.modules)"],
                             capture_output=True, text=True, cwd=tmp_path)
        assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "False", "")


@pytest.mark.slow
def test_stock_command_trains_per_person_and_no_person_id_leaves_the_ledger(tmp_path, capfd):
    """privacy_unit=person through the stock command on the embedded writers: N is the persons, the
    ledger holds their keyed hashes, and no writer id reaches the checkpoint, args.yaml, the
    console or the ledger file."""
    from ultralytics_dp.datasets import embedded as datasets

    root = datasets.build("digits-persons-cls", root=tmp_path / "data")
    ledger = tmp_path / "ledger.sqlite"
    yolo(f"yolo train model=yolo26n-cls.yaml data={root} epochs=1 imgsz=32 batch=16 workers=0 plots=False "
         f"project={tmp_path} name=run epsilon=3 delta=1e-4 privacy_unit=person persons=persons.csv "
         f"max_images_per_person=3 ledger={ledger}")
    console = capfd.readouterr()
    run = tmp_path / "run"
    entry = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    writers = {line.split(",")[1] for line in (root / "persons.csv").read_text().splitlines()[1:]}
    assert entry["privacy_unit"] == "person" and entry["num_samples"] == 287 == len([w for w in writers if "-t" in w])
    assert entry["settings"]["max_images_per_person"] == 3 and 0 < entry["steps"] and entry["epsilon"] <= 3
    assert entry["sample_rate"] == pytest.approx(16 / 287)
    assert Ledger(ledger, create=False).person_epsilons(1e-4)["persons"] == 287
    texts = [console.out + console.err, (run / "args.yaml").read_text(), (run / "weights" / "last.pt").read_bytes(),
             ledger.read_bytes()]
    sample = sorted(writers)[:50]
    assert not [w for w in sample for t in texts if (w if isinstance(t, str) else w.encode()) in t]


@pytest.mark.slow
def test_a_validation_image_without_a_person_refuses_the_run_and_records_nothing(tmp_path):
    from ultralytics_dp.datasets import embedded as datasets

    root = datasets.build("digits-persons-cls", root=tmp_path / "data")
    rows = (root / "persons.csv").read_text().splitlines()
    dropped = next(r for r in rows if r.startswith("val/"))
    persons = tmp_path / "persons.csv"
    persons.write_text("\n".join(r for r in rows if r != dropped) + "\n")
    ledger = tmp_path / "ledger.sqlite"
    with pytest.raises(ValueError, match=f"validation image .*{dropped.split(',')[0]} has no person"):
        yolo(f"yolo train model=yolo26n-cls.yaml data={root} epochs=1 imgsz=32 batch=16 workers=0 project={tmp_path} "
             f"name=run epsilon=3 delta=1e-4 privacy_unit=person persons={persons} ledger={ledger}")
    assert not (tmp_path / "run").exists()
    assert not ledger.exists() or Ledger(ledger, create=False).summary()["datasets"] == []


def _versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m; print(' '.join(m.version(p) for p in "
            "('torch', 'torchvision', 'ultralytics')))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(("torch", "torchvision", "ultralytics"), out))


@pytest.mark.slow
def test_the_built_wheel_installs_beside_the_users_ultralytics_and_keeps_their_versions(tiny_det, tmp_path):
    """What users install: ``python -m build`` makes an sdist and a wheel with version ranges (no
    ``==`` for torch, torchvision or Ultralytics); the wheel goes into an environment that already
    has Ultralytics from the oldest end of the window, pip replaces nothing (every dependency is
    already met: ``--no-index`` would fail otherwise), and the stock command trains privately there."""
    import zipfile

    tools = tmp_path / "tools"
    venv.create(tools, with_pip=True)
    subprocess.run([tools / "bin" / "python", "-m", "pip", "install", "-q", "build"], check=True, capture_output=True)
    dist = tmp_path / "dist"
    built = subprocess.run([tools / "bin" / "python", "-m", "build", "--sdist", "--wheel", "--outdir", dist, REPO],
                           capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "ultralytics_dp.pth" in archive.namelist()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    pinned = [r for r in requires if re.match(r"Requires-Dist: (torch|torchvision|ultralytics)\b.*==", r)]
    assert requires and not pinned and sdist.stat().st_size > 0

    bin_dir = _fresh_venv(tmp_path / "user")
    oldest = keys.ULTRALYTICS_WINDOW[0]
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", f"ultralytics=={oldest}"], check=True,
                   capture_output=True)
    before = _versions(bin_dir / "python")
    installed = subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", wheel],
                               capture_output=True, text=True, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert _versions(bin_dir / "python") == before and before["ultralytics"] == oldest

    _trains_privately_with_the_console_script(bin_dir, tiny_det, tmp_path, epsilon=8)
    plan = subprocess.run([bin_dir / "yolo-dp", "privacy", "n=1000", "batch=100", "epochs=3", "delta=1e-5", "epsilon=8"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert plan.returncode == 0 and "noise" in plan.stdout.lower(), plan.stdout + plan.stderr
