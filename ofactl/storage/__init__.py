"""Feature stores: Zarr v3 groups keyed by rate (``zarr_store``), HDF5 export (``hdf5_export``).

    from ofactl.storage import open_store
    g = open_store("feats.zarr").group(0.5)
    x = g["spk000_kw_yes_0"]            # (frames, layers, dim) numpy array
    for utt_id, feats in g: ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ofactl.storage.zarr_store import FeatureGroup, FeatureStore, open_store, rate_key

__all__ = ["FeatureGroup", "FeatureStore", "describe_store", "open_store", "rate_key"]


def describe_store(path: Path, verify: bool = False) -> dict[str, Any]:
    """What ``ofactl info feats.zarr`` prints: one entry per rate group, with the skipped inputs
    and their reasons. ``verify``: check every done utterance against its checksum and mark the
    damaged ones not done (under the group's writer lock), listed in ``damaged``."""
    p = Path(path)
    if p.is_file():  # an HDF5 export (a store is a folder, whatever its name)
        from ofactl.storage.hdf5_export import describe_hdf5

        return describe_hdf5(p)
    store = open_store(p)
    if verify:
        store = FeatureStore(p, mode="a")  # repair writes done flags
    groups = [_describe_group(store, name, verify) for name in store.group_names()]
    return {"path": str(p), "kind": "feature store", "format_version": store.attrs.get("format_version"),
            "size_mb": round(store.size_bytes() / 1e6, 2), "groups": groups}


def _describe_group(store: FeatureStore, name: str, verify: bool) -> dict[str, Any]:
    from ofactl.errors import StoreError
    from ofactl.storage.lock import group_writers

    writing = {"writing": "; ".join(w)} if (w := group_writers(store.path, name)) else {}
    if not store.is_complete_group(name):
        return {"group": name, "state": "half-created (no features; the next extract rebuilds it)", **writing}
    g = store.group(name)
    a = g.attrs
    doc: dict[str, Any] = {"group": name, "requested_rate": a.get("requested_rate"), "mode": a.get("mode"),
                           "level_db": a.get("level_db"), "utterances": len(g), **writing}
    if verify:
        doc["damaged"] = _verify(store, g)
        a = g.attrs
    try:
        done = g.done
        skipped = {**a.get("corpus_errors", {}), **g.errors}
        frames = g.frames
    except StoreError as e:
        return {**doc, "state": f"damaged ({e}); run 'ofactl info {store.path} --verify'"}
    doc.update({
        "done": int(done.sum()), "complete": bool(a.get("complete")), "frames": frames,
        "achieved_rate": a.get("achieved_rate"),
        "frame_period_ms": a.get("achieved_frame_period_ms") or a.get("frame_period_ms"),
        "layers": a.get("layers"), "dim": a.get("dim"), "dtype": a.get("dtype"),
        "size_mb": round(store.size_bytes(g.rate) / 1e6, 2), "student_sha256": a.get("student_sha256"),
        "skipped_inputs": len(skipped), "skipped": skipped, "checksums": bool(a.get("checksum")),
    })
    return doc


def _verify(store: FeatureStore, g: FeatureGroup) -> list[dict[str, str]]:
    from ofactl.progress import NullProgress
    from ofactl.storage.lock import GroupLock

    with GroupLock(store.path, g.name, None, NullProgress()):
        damaged = g.verify()
        g.repair(damaged)
    return [{"id": d.utt_id, "reason": d.reason} for d in damaged]
