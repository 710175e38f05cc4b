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

__all__ = ["FeatureGroup", "FeatureStore", "open_store", "rate_key", "describe_store"]


def describe_store(path: Path) -> dict[str, Any]:
    """What ``ofactl info feats.zarr`` prints: one entry per rate group."""
    p = Path(path)
    if p.suffix in (".h5", ".hdf5"):
        from ofactl.storage.hdf5_export import describe_hdf5

        return describe_hdf5(p)
    store = open_store(p)
    groups = []
    for name in store.group_names():
        g = store.group(name)
        a = g.attrs
        done = g.done
        groups.append({
            "group": name, "requested_rate": a.get("requested_rate"), "mode": a.get("mode"),
            "utterances": len(g), "done": int(done.sum()), "complete": bool(a.get("complete")),
            "frames": g.frames, "achieved_rate": a.get("achieved_rate"),
            "frame_period_ms": a.get("achieved_frame_period_ms") or a.get("frame_period_ms"),
            "layers": a.get("layers"), "dim": a.get("dim"), "dtype": a.get("dtype"),
            "size_mb": round(store.size_bytes(g.rate) / 1e6, 2),
            "student_sha256": a.get("student_sha256"),
            "skipped_inputs": len(a.get("errors", {})) if a.get("complete") else len(g.errors) + len(a.get("corpus_errors", {})),
        })
    return {"path": str(p), "kind": "feature store", "format_version": store._root.attrs.get("format_version"),
            "size_mb": round(store.size_bytes() / 1e6, 2), "groups": groups}
