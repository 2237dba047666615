#!/usr/bin/env python3
"""FuxiCTR DeepFM, multi-epoch quality runner.  Run with bench/.envs/fuxictr/bin/python.

Model: the model_zoo DeepFM rebuilt from the package's layers (imported from bench/peers/run_fuxictr.py).
Preprocessing: FuxiCTR's own FeatureProcessor + build_dataset (train-fitted tokenizers, min_categr_count
1 = the library default):
  * Criteo-layout sets (criteo, synthetic): the Criteo_x4 dataset config of FuxiCTR/BARS --
    I1..I13 float, categorical, preprocess convert_to_bucket (log^2 buckets); C1..C26 str categorical.
  * other sets: categorical columns str categorical; numeric columns float "numeric" with
    normalizer MinMaxScaler (FuxiCTR's documented numeric feature spec).
Training: model.fit(train_gen, validation_data=valid_gen, epochs=E) with the library's own monitor
(AUC, mode max), early_stop_patience=P, reduce-lr-on-plateau and best-checkpoint reload; optimizer adam,
binary_crossentropy, hidden_units [400, 400, 400], lr 1e-3, library defaults otherwise (no regulariser,
grad-norm clipping 10).  Ray (used by build_dataset and the loaders) is started with num_cpus=1.
"""
import logging
import os
import shutil
import sys
import tempfile

import _qcommon as q
import numpy as np


import polars as pl  # noqa: E402
from fuxictr.datasets.criteo import CustomizedFeatureProcessor  # noqa: E402
from fuxictr.preprocess import FeatureProcessor  # noqa: E402


def _read_tsv(self, data_path, data_format="csv", sep="\t", n_rows=None, **kw):
    return pl.scan_csv(data_path, separator="\t", has_header=True, schema_overrides=type(self).dtype,
                       low_memory=False, n_rows=n_rows)


class CriteoTSV(CustomizedFeatureProcessor):
    dtype: dict = {}
    read_data = _read_tsv


class PlainTSV(FeatureProcessor):
    dtype: dict = {}
    read_data = _read_tsv


def main():
    args = q.parser(__doc__.splitlines()[0]).parse_args()
    t0 = q.setup(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import polars as pl
    import ray
    import fuxictr
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything
    sys.argv = sys.argv[:1]
    import run_fuxictr  # bench/peers: the model_zoo DeepFM

    seed_everything(args.seed)
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    sc = q.schema(args)
    label, num, cat = sc["label"], sc["numeric"], sc["categorical"]
    criteo_like = sc["name"] in ("criteo", "synthetic")
    if criteo_like:
        feature_cols = [{"name": num, "active": True, "dtype": "float", "type": "categorical",
                         "preprocess": "convert_to_bucket", "fill_na": 0},
                        {"name": cat, "active": True, "dtype": "str", "type": "categorical", "fill_na": ""}]
        TSV = CriteoTSV
    else:
        feature_cols = [{"name": cat, "active": True, "dtype": "str", "type": "categorical", "fill_na": ""}]
        if num:
            feature_cols.append({"name": num, "active": True, "dtype": "float", "type": "numeric",
                                 "normalizer": "MinMaxScaler", "fill_na": 0})
        TSV = PlainTSV
    dtype = {label: pl.Float64, **{c: pl.Float64 for c in num}, **{c: pl.String for c in cat}}

    work = args.workdir or tempfile.mkdtemp(prefix="fuxictr_q_")
    data_root, model_root = os.path.join(work, "data"), os.path.join(work, "ckpt")
    dataset_id = "q_" + sc["name"]
    shutil.rmtree(os.path.join(data_root, dataset_id), ignore_errors=True)
    TSV.dtype = dtype
    fp = TSV(feature_cols=feature_cols, label_col={"name": label, "dtype": "float"}, dataset_id=dataset_id,
             data_root=data_root)
    tr_p, va_p, te_p = build_dataset(fp, train_data=q.path(args, "train"), valid_data=q.path(args, "valid"),
                                     test_data=q.path(args, "test"), data_format="csv")
    params = {"model_root": model_root, "verbose": 0, "metrics": ["logloss", "AUC"], "optimizer": "adam",
              "loss": "binary_crossentropy", "embedding_dim": args.embedding_dim, "batch_size": args.batch_size,
              "data_format": "parquet", "shuffle": True, "num_workers": 1, "monitor": "AUC",
              "monitor_mode": "max", "early_stop_patience": args.patience, "seed": args.seed}
    fmap = FeatureMap(dataset_id, os.path.join(data_root, dataset_id))
    fmap.load(os.path.join(data_root, dataset_id, "feature_map.json"), params)
    train_gen, valid_gen = RankDataLoader(fmap, stage="train", train_data=tr_p, valid_data=va_p,
                                          batch_size=args.batch_size, shuffle=True, data_format="parquet")
    model = run_fuxictr.DeepFM(fmap, gpu=-1, learning_rate=args.lr, hidden_units=[400, 400, 400], **params)
    os.makedirs(model.model_dir, exist_ok=True)
    model.fit(train_gen, epochs=args.epochs, validation_data=valid_gen)
    import pandas as pd
    out = {}
    for split, p in (("valid", va_p), ("test", te_p)):
        gen = RankDataLoader(fmap, stage="test", test_data=p, batch_size=4096, shuffle=False, data_format="parquet")
        out[split] = (pd.read_parquet(p, columns=[label])[label].to_numpy(), np.asarray(model.predict(gen)))
    epochs_run = model._epoch_index + 1
    ray.shutdown()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    q.finish("fuxictr", fuxictr.__version__, args, t0, *out["valid"], *out["test"], epochs_run=epochs_run)


if __name__ == "__main__":
    main()
