"""``toolkit bundle``: one tarball with everything a Linux board needs to run the edge runtime.

Layout (under ``hiertrain-edge/``): ``artifacts/`` (the exported, hash-checked
artifacts), ``board.yaml`` (the board profile), ``hiertrain-edge.service`` (a
systemd unit), ``edge.env`` (the settings the unit reads: broker or serial
port, device id, run id, data), ``board-requirements.txt`` and the hiertrain wheel
(the lean install: what the edge runtime imports, nothing more; ``toolkit.deploy.wheel``)
and ``INSTALL.md``. The tarball is reproducible:
entries are sorted and carry a fixed time and owner, so the same inputs give the
same bytes (and the same sha256 to pin in a fleet tool).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

from toolkit import __version__
from toolkit.core.artifacts.boards import BoardProfile, configs_dir, load_board
from toolkit.core.artifacts.manifest import MANIFEST_NAME, load_manifest
from toolkit.core.errors import HiertrainError
from toolkit.deploy.wheel import BOARD_REQUIREMENTS, board_requirements, build_wheel, wheel_name

ROOT = "hiertrain-edge"
UNIT_NAME = "hiertrain-edge.service"
PREFIX = "/opt/hiertrain"
STATE = "/var/lib/hiertrain"
ENV_FILE = "/etc/hiertrain/edge.env"

_UNIT = """\
# hiertrain edge runtime for {board} ({description}).
# Installed by INSTALL.md; settings in {env}.
# --resume: a crash, a restart or a reboot continues the run from the checkpoint and spool
# in {state} (a fresh state directory starts at the first batch); a new run needs a new
# HIERTRAIN_RUN_ID. --board: threads and spool budget from the board profile.
[Unit]
Description=hiertrain edge runtime ({board})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=hiertrain
SupplementaryGroups=dialout
EnvironmentFile={env}
WorkingDirectory={state}
ExecStart={prefix}/venv/bin/edge-runtime train --artifacts {prefix}/artifacts \
--broker ${{HIERTRAIN_BROKER}} --device-id ${{HIERTRAIN_DEVICE_ID}} \
--run-id ${{HIERTRAIN_RUN_ID}} --data ${{HIERTRAIN_DATA}} --epochs ${{HIERTRAIN_EPOCHS}} \
--board {prefix}/board.yaml --resume --state-dir {state} --report {state}/last-run.json --quiet
Restart=on-failure
RestartSec=30
# the board profile's memory budget for hiertrain: the robot's own stack keeps the rest
MemoryMax={budget}M
Nice=5

[Install]
WantedBy=multi-user.target
"""

_ENV = """\
# hiertrain edge runtime settings (read by {unit}).
# Broker: mqtt://host:1883, or a serial line to a 'toolkit gateway':
#   HIERTRAIN_BROKER=serial://{serial_port}?baud={baud}
HIERTRAIN_BROKER=mqtt://cloud.local:1883
HIERTRAIN_DEVICE_ID=robot-1
HIERTRAIN_RUN_ID=default
HIERTRAIN_DATA={state}/data
HIERTRAIN_EPOCHS=3
"""

_INSTALL = """\
# Installing the hiertrain edge runtime on {board}

{description}. Bundle made from a `{model}` export split at `{split}`, batch {batch}.

1. Python 3.10-3.12 and a virtual environment with the edge runtime and only what it
   imports (as root). torch first, from PyTorch's CPU-only index: the package index's
   aarch64 torch is a CUDA build that pulls several GB of CUDA libraries a board never uses
   (and its CPU kernels need ARMv8.2; the edge runs none of them, docs/deploy.md):

       apt-get install -y python3-venv
       python3 -m venv {prefix}/venv
       {prefix}/venv/bin/pip install torch=={torch} --index-url https://download.pytorch.org/whl/cpu
       {prefix}/venv/bin/pip install --no-deps -r {root}/board-requirements.txt {wheel}

   `--no-deps`: executorch's own metadata asks for its build stack (scikit-learn, pandas,
   coremltools, ...), which the edge runtime never imports; board-requirements.txt lists
   what it does import.{no_wheel}

2. Put the rest of this bundle in place (unpacked with `tar -xzf edge-bundle.tar.gz`
   before step 1):

       mkdir -p {prefix} /etc/hiertrain {state}/data
       cp -r {root}/artifacts {prefix}/artifacts
       cp {root}/board.yaml {prefix}/board.yaml
       cp {root}/edge.env {env}
       cp {root}/{unit} /etc/systemd/system/{unit}

3. A user for the service (in `dialout` for serial links) owning its state directory:

       useradd --system --home {state} --groups dialout hiertrain
       chown -R hiertrain: {state}

4. Check the artifacts (every sha256 against manifest.json):

       {prefix}/venv/bin/python -c "from toolkit.core.artifacts.manifest import load_manifest; \\
load_manifest('{prefix}/artifacts'); print('artifacts ok')"

5. Edit {env}: broker URL (or `serial://{serial_port}?baud={baud}` with a
   `toolkit gateway` on the other end of the line), device id, run id and the
   training data: a .npz (x_train/y_train/x_test/y_test) or an ImageFolder tree with
   train/ and test/ (image folders need `pip install torchvision pillow` too; `digits`
   needs scikit-learn, which a board does not install).

6. Start it, now and at every boot, and watch it:

       systemctl daemon-reload
       systemctl enable --now {unit}
       journalctl -u {unit} -f

The unit caps the service at the board profile's budget of {budget} MB
(`MemoryMax`); the edge takes its {threads} threads and its {spool_mb} MB spool from
{prefix}/board.yaml (`--board`). It runs with `--resume`: after a crash, a restart or a
reboot it continues the run from its checkpoint and spool in {state} instead of starting
again at the first batch. A finished run stays finished; for a new run (or new artifacts)
set a new HIERTRAIN_RUN_ID in {env}. The last run's report is in {state}/last-run.json
and the trained edge weights in {state}/edge_weights-<device>.pt.
"""


def _board_yaml(board: str, profile: BoardProfile) -> bytes:
    path = Path(board)
    if path.suffix not in (".yaml", ".yml"):
        path = configs_dir() / f"{profile.name}.yaml"
    return path.read_bytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(f"{ROOT}/{name}")
    info.size, info.mode, info.mtime = len(data), mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def build_bundle(*, board: str, artifacts: Path, out: Path, wheel: bool = True) -> Path:
    """Write the tarball; HiertrainError for a bad board, unverifiable artifacts or ``out``.

    ``wheel``: pack the hiertrain wheel built from this source tree (False: the board
    installs hiertrain from a package index, INSTALL.md says so)."""
    profile = load_board(board)
    manifest = load_manifest(artifacts)  # refuses artifacts that fail their hashes
    whl = build_wheel() if wheel else None
    fill = dict(board=profile.name, description=profile.description, env=ENV_FILE,
                state=STATE, prefix=PREFIX, threads=profile.threads, budget=profile.budget_mb,
                spool_mb=profile.spool_mb,
                unit=UNIT_NAME, root=ROOT, serial_port=profile.serial.get("port", "/dev/ttyUSB0"),
                baud=profile.serial.get("baud", 115200), model=manifest.model_name,
                split=manifest.split, batch=manifest.batch_size,
                torch=manifest.data.get("versions", {}).get("torch", "2.14.1").split("+")[0],
                wheel=f"{ROOT}/{wheel_name()}" if whl else f"hiertrain=={__version__}",
                no_wheel="" if whl else (
                    "\n   This bundle has no hiertrain wheel (`toolkit bundle --no-wheel`): "
                    "the last\n   command installs hiertrain from your package index."))
    files: dict[str, bytes] = {
        f"artifacts/{n}": (Path(artifacts) / n).read_bytes()
        for n in [MANIFEST_NAME, *manifest.data["artifacts"]]
    }
    files["board.yaml"] = _board_yaml(board, profile)
    files[UNIT_NAME] = _UNIT.format(**fill).encode()
    files["edge.env"] = _ENV.format(**fill).encode()
    files["INSTALL.md"] = _INSTALL.format(**fill).encode()
    files[BOARD_REQUIREMENTS] = board_requirements()
    if whl:
        files[wheel_name()] = whl
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(
                filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(files):
                _add(tar, name, files[name])
        tmp.replace(out)
    except OSError as exc:
        raise HiertrainError(f"cannot write bundle {out}: {exc}") from None
    return out
