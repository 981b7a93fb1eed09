"""Staging: CIFAR-10, the wheels and the carried run directories, sent to the device machine in
calls of under 64 MiB and checked by sha256 on arrival.

A device call carries the working tree and the paths named in its ``carry``, 64 MiB in all. The
CIFAR-10 copy is 163 MiB (`SOURCE_SHA256`, from /work/shared/data/README.md), so it is first
coded losslessly (`encode_images`: green, red - green and blue - green planes, each pixel minus
the median-edge prediction of LOCO-I from its left, upper and upper-left neighbours, then lzma;
48 % of the raw pixels, 84.5 MiB), then cut into parts that fill the room each call leaves.
`stage` writes one folder per call (``stage/call<k>/``: its files and the manifest, which names
every part with its sha256 and the sha256 of the decoded arrays); on the device, `receive` checks
each file against the manifest, keeps it in ``$STEPJAX_DEVICE_ROOT`` (default /tmp/stepjax,
which outlives a call on a warm machine), installs wheels, unpacks carried run directories and,
once every part is there, rebuilds the payload, decodes it and writes ``data/cifar10/{train,test}.npz``
with a ``READY.json`` that `data_status` (the runner's check) reads.

This module uses the standard library and numpy only, so that the device can run it as a script
before anything is installed there:

    python3 stepjax/campaign/staging.py receive stage/call1
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

MIB = 2**20
CALL_LIMIT = 64 * MIB  # what one device call may carry, working tree included
# sha256 of the CIFAR-10 npz copy (/work/shared/data/README.md)
SOURCE_SHA256 = {
    "train.npz": "fb8790d22df37950c995a3b1eb78546fa3c479ea51c6f256ee622ca766571a98",
    "test.npz": "7005466999e3d2a07aa49211b17b0f1ba6fe778988f3d44fc9334f4663100734",
}
SPLITS = ("train", "test")
DEVICE_ROOT_ENV = "STEPJAX_DEVICE_ROOT"
PAYLOAD = "cifar10.npz.xz"
MANIFEST = "manifest.json"
READY = "READY.json"
# room kept in every call for the manifest and for what the tree gains between staging and the call
MARGIN = 2 * MIB


def device_root() -> Path:
    """Where the device keeps what arrived: ``$STEPJAX_DEVICE_ROOT``, else /tmp/stepjax."""
    return Path(os.environ.get(DEVICE_ROOT_ENV) or "/tmp/stepjax")


def data_dir(root: str | Path) -> Path:
    """The folder of the rebuilt npz files under a device root."""
    return Path(root) / "data" / "cifar10"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# the lossless image code
# ----------------------------------------------------------------------------------------------


def _med(left, up, corner):
    """LOCO-I's median-edge predictor: min(left, up) under an edge above, max under one below, else
    the plane through the three neighbours."""
    high, low = np.maximum(left, up), np.minimum(left, up)
    return np.where(corner >= high, low, np.where(corner <= low, high, left + up - corner))


def _predict(planes):
    """The prediction of every pixel of int16 planes ``[..., H, W]`` from its causal neighbours:
    the median-edge predictor inside, the left pixel in the first row, the upper one in the first
    column, 0 at the corner."""
    pred = np.zeros_like(planes)
    pred[..., 1:, 1:] = _med(planes[..., 1:, :-1], planes[..., :-1, 1:], planes[..., :-1, :-1])
    pred[..., 0, 1:] = planes[..., 0, :-1]
    pred[..., 1:, 0] = planes[..., :-1, 0]
    return pred


def encode_images(images: np.ndarray) -> np.ndarray:
    """Residuals of uint8 RGB images ``[N, H, W, 3]``: uint8 ``[3, N, H, W]`` (inverse: `decode_images`)."""
    x = images.astype(np.int16)
    green = x[..., 1]
    planes = np.stack([green, (x[..., 0] - green) % 256, (x[..., 2] - green) % 256])
    return ((planes - _predict(planes)) % 256).astype(np.uint8)


def decode_images(residuals: np.ndarray) -> np.ndarray:
    """The images whose residuals `encode_images` gave, exactly: uint8 ``[N, H, W, 3]``."""
    _, count, height, width = residuals.shape
    # pixel-major ([H, W, 3 * N]): each step below reads and writes contiguous rows of every image
    res = np.ascontiguousarray(residuals.transpose(2, 3, 0, 1)).reshape(height, width, -1).astype(np.int16)
    planes = np.zeros_like(res)
    for d in range(height + width - 1):  # an anti-diagonal needs only the two before it
        i = np.arange(max(0, d - width + 1), min(d, height - 1) + 1)
        j = d - i
        left = planes[i, np.maximum(j - 1, 0)]
        up = planes[np.maximum(i - 1, 0), j]
        corner = planes[np.maximum(i - 1, 0), np.maximum(j - 1, 0)]
        # inside: the median-edge prediction; first row: the left pixel (at the corner the
        # still-zero pixel itself); first column: the upper one
        pred = np.where(((i > 0) & (j > 0))[:, None], _med(left, up, corner), np.where((i == 0)[:, None], left, up))
        planes[i, j] = (res[i, j] + pred) % 256
    planes = planes.reshape(height, width, 3, count).transpose(2, 3, 0, 1)
    green = planes[0]
    rgb = [(planes[1] + green) % 256, green, (planes[2] + green) % 256]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def array_digests(images: np.ndarray, labels: np.ndarray) -> dict:
    """What the device checks after decoding a split: its shapes and the sha256 of its bytes."""
    return {"shape": list(images.shape), "image_sha256": sha256_bytes(np.ascontiguousarray(images).tobytes()),
            "label_dtype": str(labels.dtype), "label_sha256": sha256_bytes(np.ascontiguousarray(labels).tobytes())}


def pack_dataset(splits: dict) -> bytes:
    """``{split: (images, labels)}`` -> the lzma-compressed payload of their residuals and labels."""
    buffer = io.BytesIO()
    arrays = {}
    for name, (images, labels) in splits.items():
        arrays[f"{name}_residual"], arrays[f"{name}_label"] = encode_images(images), labels
    np.savez(buffer, **arrays)
    return lzma.compress(buffer.getvalue(), preset=6)


def unpack_dataset(payload: bytes) -> dict:
    """The inverse of `pack_dataset`: ``{split: (images, labels)}``."""
    with np.load(io.BytesIO(lzma.decompress(payload))) as archive:
        names = sorted({key.rsplit("_", 1)[0] for key in archive.files})
        return {n: (decode_images(archive[f"{n}_residual"]), archive[f"{n}_label"]) for n in names}


# ----------------------------------------------------------------------------------------------
# run directories carried both ways (checkpoint and record)
# ----------------------------------------------------------------------------------------------


def latest_checkpoint(workdir: str | Path) -> Path | None:
    """The newest step directory under ``<workdir>/checkpoints``, or None."""
    steps = [p for p in (Path(workdir) / "checkpoints").glob("*") if p.is_dir() and p.name.isdigit()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def bundle_run(workdir: str | Path, base: str | Path, dest: str | Path) -> Path:
    """Pack a run directory for the journey: its record files, and of its checkpoints the newest
    step only, as a ``.tar.gz`` whose paths are relative to `base` (e.g. ``runs/gpu/<name>/...``).

    **Arguments:**

    - `workdir`: the run directory (under `base`).
    - `base`: the folder the paths in the archive are relative to.
    - `dest`: the archive to write.

    **Returns:**

    `dest`.
    """
    workdir, base = Path(workdir), Path(base)
    latest = latest_checkpoint(workdir)
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(workdir.iterdir()):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(base)))
        if latest is not None:
            for path in sorted((workdir / "checkpoints").iterdir()):  # orbax's own files beside the steps
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(base)))
            tar.add(latest, arcname=str(latest.relative_to(base)))
    return Path(dest)


def unbundle_run(archive: str | Path, base: str | Path) -> list[str]:
    """Unpack a `bundle_run` archive under `base` (replacing the checkpoint steps of the run
    directories it holds); returns those run directories, relative to `base`."""
    base = Path(base)
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        runs = sorted({str(Path(n).parent) for n in names if Path(n).name == "config.json"})
        for run in runs:
            shutil.rmtree(base / run / "checkpoints", ignore_errors=True)
        tar.extractall(base, filter="data")
    return runs


# ----------------------------------------------------------------------------------------------
# CPU side: the call folders
# ----------------------------------------------------------------------------------------------


def check_sources(source: str | Path, expected: dict | None = SOURCE_SHA256) -> None:
    """Refuse a CIFAR-10 copy whose files are missing or differ from `expected` (sha256 by name)."""
    for name in (f"{split}.npz" for split in SPLITS):
        path = Path(source) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: point --data at the CIFAR-10 npz copy "
                                    "(/work/shared/data/cifar10).")
        if expected is not None and sha256_file(path) != expected[name]:
            raise ValueError(f"{path}: sha256 differs from the copy described in /work/shared/data/README.md "
                             f"({expected[name][:12]}...): not the expected CIFAR-10 files.")


def encoded_payload(source: str | Path, cache: str | Path, expected: dict | None = SOURCE_SHA256) -> tuple[Path, dict]:
    """The coded payload of a CIFAR-10 npz copy and the digests of its arrays, cached in `cache`
    under the sources' hashes (coding takes minutes; a second staging reuses it)."""
    check_sources(source, expected)
    key = sha256_bytes("".join(sha256_file(Path(source) / f"{s}.npz") for s in SPLITS).encode())[:16]
    cache = Path(cache)
    payload, digests = cache / f"{key}-{PAYLOAD}", cache / f"{key}-arrays.json"
    if payload.exists() and digests.exists():
        return payload, json.loads(digests.read_text())
    splits = {}
    for split in SPLITS:
        with np.load(Path(source) / f"{split}.npz") as archive:
            splits[split] = (archive["image"], archive["label"])
    cache.mkdir(parents=True, exist_ok=True)
    payload.write_bytes(pack_dataset(splits))
    digests.write_text(json.dumps({s: array_digests(*splits[s]) for s in SPLITS}, indent=1))
    return payload, json.loads(digests.read_text())


def plan_calls(payload_size: int, extras: list[dict], capacity: int) -> list[dict]:
    """Assign the extras (wheels first, then run bundles, each whole) and the payload's bytes to
    calls of at most `capacity` bytes; the payload fills what the extras leave.

    **Returns:**

    One ``{"extras": [...], "part": (offset, size) or None}`` per call.
    """
    too_big = [e["name"] for e in extras if e["size"] > capacity]
    if too_big:
        raise ValueError(f"{', '.join(too_big)}: larger than the {capacity / MIB:.1f} MiB a call can carry "
                         "beside the working tree; make the tree smaller or leave it out.")
    calls = []
    for extra in sorted(extras, key=lambda e: (e["kind"] != "wheel", -e["size"])):
        fits = [c for c in calls if c["used"] + extra["size"] <= capacity]
        if not fits:
            calls.append({"extras": [], "used": 0})
            fits = calls[-1:]
        fits[0]["extras"].append(extra)
        fits[0]["used"] += extra["size"]
    offset, k = 0, 0
    while offset < payload_size or k < len(calls):
        if k == len(calls):
            calls.append({"extras": [], "used": 0})
        size = min(payload_size - offset, capacity - calls[k]["used"])
        calls[k]["part"] = (offset, size) if size > 0 else None
        offset, k = offset + max(size, 0), k + 1
    return [{"extras": c["extras"], "part": c.get("part")} for c in calls]


def stage(source: str | Path | None, out: str | Path, *, capacity: int, extras: list[tuple[str, Path]] = (),
          expected: dict | None = SOURCE_SHA256, code: str | None = None) -> dict:
    """Write the call folders ``<out>/call1 ... call<n>`` that carry CIFAR-10 and the `extras`.

    **Arguments:**

    - `source`: the CIFAR-10 npz copy (train.npz, test.npz), or None to carry no data.
    - `out`: the staging folder (``stage/``, ignored by git); its old call folders are replaced,
      its ``cache/`` kept.
    - `capacity`: the bytes one call may carry beside the working tree.
    - `extras`: ``(kind, path)`` pairs: ``wheel`` (installed on the device) or ``run`` (a
      `bundle_run` archive, unpacked under the device root).
    - `expected`: the sources' sha256 by file name (None: not checked).
    - `code`: the version of the code that travels with the calls (the device's copy of the tree
      has no git history; `staged_code` gives it back there).

    **Returns:**

    The manifest (also written into every call folder).
    """
    out = Path(out)
    data, digests = b"", None
    if source is not None:
        payload, digests = encoded_payload(source, out / "cache", expected)
        data = payload.read_bytes()
    entries = [{"kind": kind, "name": Path(path).name, "path": str(path), "size": Path(path).stat().st_size,
                "sha256": sha256_file(path)} for kind, path in extras]
    calls = plan_calls(len(data), entries, capacity) or [{"extras": [], "part": None}]
    files = []
    for k, call in enumerate(calls, 1):
        files += [{**{key: e[key] for key in ("kind", "name", "size", "sha256")}, "call": k} for e in call["extras"]]
        if call["part"]:
            offset, size = call["part"]
            files.append({"kind": "part", "name": f"{PAYLOAD}.{k:02d}", "call": k, "offset": offset, "size": size,
                          "sha256": sha256_bytes(data[offset:offset + size])})
    stage_id = sha256_bytes(json.dumps(files, sort_keys=True).encode())[:16]
    payload_entry = {"name": PAYLOAD, "size": len(data), "sha256": sha256_bytes(data)} if digests else None
    manifest = {"stage_id": stage_id, "calls": len(calls), "code": code, "payload": payload_entry, "arrays": digests,
                "files": files}
    for old in out.glob("call*"):
        shutil.rmtree(old)
    sources = {e["name"]: e["path"] for e in entries}
    for k in range(1, len(calls) + 1):
        folder = out / f"call{k}"
        folder.mkdir(parents=True)
        for f in (f for f in files if f["call"] == k):
            if f["kind"] == "part":
                (folder / f["name"]).write_bytes(data[f["offset"]:f["offset"] + f["size"]])
            else:
                shutil.copyfile(sources[f["name"]], folder / f["name"])
        (folder / MANIFEST).write_text(json.dumps({**manifest, "call": k}, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------
# device side: arrival
# ----------------------------------------------------------------------------------------------


class StagingError(RuntimeError):
    """A carried file is missing or corrupt, or the data are incomplete."""


def _install_wheel(path: Path, root: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(root / "site"), str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise StagingError(f"installing {path.name} failed: {done.stderr.strip().splitlines()[-1:]}")


def receive(call_dir: str | Path, root: str | Path | None = None) -> str:
    """Check and keep what one call carried; rebuild the data once every part has arrived.

    **Arguments:**

    - `call_dir`: a call folder written by `stage` (``stage/call<k>``).
    - `root`: the device root (default `device_root`).

    **Returns:**

    One line saying what arrived and what is still missing. Raises `StagingError` (nothing of the
    call kept) when a file is missing or its sha256 differs from the manifest.
    """
    call_dir, root = Path(call_dir), Path(root or device_root())
    if not (call_dir / MANIFEST).is_file():
        raise StagingError(f"{call_dir}/{MANIFEST} is missing: carry the whole folder that `make campaign-stage` wrote.")
    manifest = json.loads((call_dir / MANIFEST).read_text())
    mine = [f for f in manifest["files"] if f["call"] == manifest["call"]]
    for f in mine:
        path = call_dir / f["name"]
        if not path.is_file():
            raise StagingError(f"{path} is missing: call {manifest['call']} arrived incomplete; send it again.")
        if sha256_file(path) != f["sha256"]:
            raise StagingError(f"{path}: sha256 differs from the manifest: the copy is corrupt; send call "
                               f"{manifest['call']} again (or stage again: make campaign-stage).")
    store = root / "stage" / manifest["stage_id"]
    store.mkdir(parents=True, exist_ok=True)
    (store / MANIFEST).write_text(json.dumps({**manifest, "call": None}))
    for f in mine:
        if f["kind"] == "part":
            shutil.copyfile(call_dir / f["name"], store / f["name"])
        elif f["kind"] == "wheel":
            _install_wheel(call_dir / f["name"], root)
        else:
            unbundle_run(call_dir / f["name"], root)
    kept = ", ".join(f["name"] for f in mine) or "nothing"
    ready, line = data_status(root)
    if manifest["payload"] is None:
        line = "This staging carries no data."
    elif not ready and not _missing_parts(store, manifest):
        line = assemble(store, manifest, root)
    return f"call {manifest['call']} of {manifest['calls']}: kept {kept} (sha256 checked). {line}"


def _missing_parts(store: Path, manifest: dict) -> list[dict]:
    return [f for f in manifest["files"] if f["kind"] == "part" and not (store / f["name"]).is_file()]


def assemble(store: Path, manifest: dict, root: Path) -> str:
    """Rebuild the payload from its parts, decode it, check the arrays and write the npz files."""
    parts = sorted((f for f in manifest["files"] if f["kind"] == "part"), key=lambda f: f["offset"])
    payload = b"".join((store / f["name"]).read_bytes() for f in parts)
    if sha256_bytes(payload) != manifest["payload"]["sha256"]:
        raise StagingError(f"the payload rebuilt in {store} differs from the manifest's sha256: stage again.")
    target = data_dir(root)
    target.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in unpack_dataset(payload).items():
        if array_digests(images, labels) != manifest["arrays"][split]:
            raise StagingError(f"decoded {split} images differ from the source's digests: the code is broken; "
                               "nothing was written.")
        np.savez(target / f"{split}.npz", image=images, label=labels)
    ready = {"stage_id": manifest["stage_id"], "arrays": manifest["arrays"]}
    (target / READY).write_text(json.dumps(ready, indent=1))
    counts = ", ".join(f"{split} {manifest['arrays'][split]['shape'][0]}" for split in SPLITS)
    return f"CIFAR-10 ready in {target} ({counts}; arrays' sha256 checked)."


def staged_code(root: str | Path) -> str | None:
    """The code version recorded by the newest staging that arrived under `root`, or None."""
    manifests = sorted((Path(root) / "stage").glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    return json.loads(manifests[-1].read_text()).get("code") if manifests else None


def data_status(root: str | Path | None = None) -> tuple[bool, str]:
    """Whether the device holds the whole CIFAR-10 copy, and one line saying so or what is missing."""
    root = Path(root or device_root())
    target = data_dir(root)
    if (target / READY).is_file() and all((target / f"{s}.npz").is_file() for s in SPLITS):
        return True, f"CIFAR-10 ready in {target}."
    stores = sorted((p for p in (root / "stage").glob(f"*/{MANIFEST}") if json.loads(p.read_text())["payload"]),
                    key=lambda p: p.stat().st_mtime)
    if not stores:
        return False, (f"CIFAR-10 is not staged on this machine ({root} holds none of it): send the staging "
                       "calls first (docs/GPU.md; `make campaign-stage` prints them).")
    manifest = json.loads(stores[-1].read_text())
    missing = _missing_parts(stores[-1].parent, manifest)
    parts = [f for f in manifest["files"] if f["kind"] == "part"]
    calls = ", ".join(str(f["call"]) for f in missing)
    return False, (f"CIFAR-10 is incomplete on this machine: {len(parts) - len(missing)} of {len(parts)} parts "
                   f"arrived; send call(s) {calls} of the staging (docs/GPU.md).")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "receive":
        print("usage: python3 stepjax/campaign/staging.py receive stage/call<k>", file=sys.stderr)
        return 2
    try:
        print(receive(argv[1]), flush=True)
    except StagingError as error:
        print(f"staging: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
