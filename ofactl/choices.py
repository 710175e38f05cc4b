"""The fixed sets of values that config keys and flags take, in one light module.

Config dataclasses annotate their fields with these, so a wrong value fails when the config is
loaded (naming the key and the choices), ``--help`` lists the choices, and the generated key
table in ``docs/presets.md`` shows them. Nothing heavy is imported here: the CLI reads these
before torch is loaded.
"""

from __future__ import annotations

from typing import Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
FeatureDtype = Literal["float16", "float32"]
OnError = Literal["fail", "skip"]
StoreCompression = Literal["none", "zstd"]
StoreFormat = Literal["zarr", "hdf5"]
Task = Literal["ks", "cls", "sid", "pr", "asr"]
CompressorKind = Literal["cif", "avgpool", "none"]
Frontend = Literal["cnn", "cnn-thin", "fbank"]
CtcHead = Literal["lstm", "conv", "linear"]
ConvNorm = Literal["group_norm", "layer_norm"]
RateKind = Literal["period", "lambda", "fixed"]
RateDraw = Literal["utterance", "batch"]
Alignment = Literal["compress", "upsample", "both"]
SpectralAlignment = Literal["same", "compress", "upsample"]
CompressWeight = Literal["frame", "audio"]
LambdaData = Literal["dev", "train", "crossfit"]
LambdaGrad = Literal["difference", "pathwise"]
LambdaLoss = Literal["error", "loss", "metric"]
CostForm = Literal["log2", "linear"]
BandEdges = Literal["clamp", "inside"]
FinalProbe = Literal["fresh", "joint"]
