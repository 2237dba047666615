#!/usr/bin/env python3
"""FuxiCTR 2.3.x DeepFM peer runner.  Run with bench/.envs/fuxictr/bin/python.

The fuxictr pip package ships no model classes (they live in the repo's
model_zoo/), so ``DeepFM`` below is the model zoo's
``model_zoo/DeepFM/DeepFM_torch/src/DeepFM.py`` rebuilt 1:1 from the installed
package's own layers: FeatureEmbedding -> FactorizationMachine (its
InnerProductInteraction "product_sum" + LogisticRegression, i.e. first-order
+ pairwise FM with a bias) + MLP_Block(hidden_units, output_dim=1) on the
flattened field embeddings, summed, then sigmoid.  BaseModel supplies
compile/fit/predict, xavier_normal init for Linear layers and N(0, 1e-4)
embedding init.

Preprocessing = FuxiCTR's own Criteo pipeline (what model_zoo/run_expid.py does):
  * fuxictr.datasets.criteo.CustomizedFeatureProcessor, feature specs as in
    the FuxiCTR/BARS Criteo_x4 dataset config:
      I1..I13: dtype float, type categorical, preprocess convert_to_bucket
               (v > 2 -> floor(log(v)^2), else int(v); missing -> 0)
      C1..C26: dtype str, type categorical (missing -> "")
    Tokenizer vocabularies fitted on the train file only (min_categr_count,
    default 1 = FeatureProcessor's default; BARS Criteo_x4_001 used 10);
    unseen/rare values map to __OOV__.
  * fuxictr.preprocess.build_dataset(...): polars scan -> fit -> Ray Data
    transform -> parquet files.  The only change: read_data is overridden to
    scan a header-less TSV (FuxiCTR expects a CSV with a header row).
  * fuxictr.pytorch.dataloaders.RankDataLoader(data_format="parquet") (Ray
    Data streaming loader, shuffle=True for train).
Training: model.fit(train_gen, validation_data=test_gen, epochs=1) with
optimizer "adam", loss "binary_crossentropy", lr 1e-3, embedding_dim 16,
hidden_units [400, 400, 400]; FuxiCTR's defaults otherwise (no regularizer,
no dropout/BN, gradient-norm clipping at 10 inside fit).  fit() evaluates on
its validation_data once at the end of the epoch and checkpoints; that part is
outside epoch_wall_s (which ends at the last optimizer step).  The test file
is passed as validation_data only because fit() needs one; with one epoch it
does not affect the trained weights.
Timing: model.optimizer.step is wrapped with a timestamp (common.StepTimer).
--max-steps N: eval_steps=N and the wrapper sets model._stop_training after
step N, which is FuxiCTR's own early-stop flag.
Inference: model.predict(test_gen) at batch 4096.  Latency: model.forward on
a slice of an already-collated test batch (dict of tensors).
"""
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.claim_stdout()   # fuxictr/ray/tqdm print to stdout


import polars as pl
import torch
from torch import nn  # noqa: F401
import fuxictr
from fuxictr.datasets.criteo import CustomizedFeatureProcessor
from fuxictr.features import FeatureMap
from fuxictr.preprocess import build_dataset
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel


class DeepFM(BaseModel):
    """model_zoo/DeepFM/DeepFM_torch/src/DeepFM.py, from the package's layers."""

    def __init__(self, feature_map, model_id="DeepFM", gpu=-1, learning_rate=1e-3, embedding_dim=10,
                 hidden_units=[64, 64, 64], hidden_activations="ReLU", net_dropout=0, batch_norm=False,
                 embedding_regularizer=None, net_regularizer=None, **kwargs):
        super(DeepFM, self).__init__(feature_map, model_id=model_id, gpu=gpu,
                                     embedding_regularizer=embedding_regularizer,
                                     net_regularizer=net_regularizer, **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                             hidden_units=hidden_units, hidden_activations=hidden_activations,
                             output_activation=None, dropout_rates=net_dropout, batch_norm=batch_norm)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        feature_emb = self.embedding_layer(X)
        y_pred = self.fm(X, feature_emb)
        y_pred += self.mlp(feature_emb.flatten(start_dim=1))
        y_pred = self.output_activation(y_pred)
        return {"y_pred": y_pred}

class TSVCriteoProcessor(CustomizedFeatureProcessor):
    """FuxiCTR's Criteo processor; reads the header-less Criteo TSV."""

    def read_data(self, data_path, data_format="csv", sep="\t", n_rows=None, **kwargs):
        return pl.scan_csv(data_path, separator="\t", has_header=False, new_columns=common.COLUMNS,
                           schema_overrides=self.dtype_dict, low_memory=False, n_rows=n_rows)



def main():
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--min-categr-count", type=int, default=1)
    args = ap.parse_args()
    threads = common.setup_torch(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    work = common.workdir(args, "fuxictr")
    data_root = os.path.join(work, "data")
    model_root = os.path.join(work, "ckpt")
    dataset_id = "criteo_bench"
    shutil.rmtree(os.path.join(data_root, dataset_id), ignore_errors=True)   # always rebuild (timed)
    feature_cols = [
        {"name": common.INT_COLS, "active": True, "dtype": "float", "type": "categorical",
         "preprocess": "convert_to_bucket", "na_value": 0},
        {"name": common.CAT_COLS, "active": True, "dtype": "str", "type": "categorical", "na_value": ""},
    ]
    label_col = {"name": "label", "dtype": "float"}
    gpu = 0 if args.device.startswith("cuda") else -1
    params = {"model_root": model_root, "verbose": 0, "metrics": ["logloss", "AUC"], "optimizer": "adam",
              "loss": "binary_crossentropy", "embedding_dim": args.embedding_dim, "batch_size": args.batch_size,
              "data_format": "parquet", "shuffle": True, "num_workers": 1}

    # ---------------------------------------------------------------- prep
    t0 = time.perf_counter()
    fp = TSVCriteoProcessor(feature_cols=feature_cols, label_col=label_col, dataset_id=dataset_id, data_root=data_root)
    train_path, _valid_path, test_path = build_dataset(fp, train_data=args.train, valid_data=None,
                                                       test_data=args.test, data_format="csv",
                                                       min_categr_count=args.min_categr_count)
    feature_map = FeatureMap(dataset_id, os.path.join(data_root, dataset_id))
    feature_map.load(os.path.join(data_root, dataset_id, "feature_map.json"), params)
    train_gen, test_gen_v = RankDataLoader(feature_map, stage="train", train_data=train_path, valid_data=test_path,
                                           batch_size=args.batch_size, shuffle=True, data_format="parquet")
    test_gen = RankDataLoader(feature_map, stage="test", test_data=test_path, batch_size=4096,
                              shuffle=False, data_format="parquet")
    t_prep = time.perf_counter() - t0
    n_train, n_test = train_gen.num_samples, test_gen.num_samples

    # ---------------------------------------------------------------- model
    extra = {"eval_steps": args.max_steps} if args.max_steps else {}
    model = DeepFM(feature_map, gpu=gpu, learning_rate=args.lr,
                   hidden_units=[400, 400, 400], **{**params, **extra})
    os.makedirs(model.model_dir, exist_ok=True)   # run_expid's set_logger normally creates it
    timer = common.StepTimer(model.optimizer, args.batch_size, max_steps=args.max_steps,
                             on_max=lambda: setattr(model, "_stop_training", True))
    timer.start()
    model.fit(train_gen, epochs=1, validation_data=test_gen_v)
    n_seen = min(n_train, timer and len(timer.stamps) * args.batch_size)
    tr = timer.summary(n_seen if args.max_steps else n_train)
    timer.restore()

    # ---------------------------------------------------------------- inference
    pred, t_inf = common.timed_passes(lambda: model.predict(test_gen))
    import pandas as pd
    y_test = pd.read_parquet(test_path, columns=["label"])["label"].to_numpy()
    it = iter(test_gen)
    batch = {k: v.clone() for k, v in next(it).items()}
    del it
    import ray
    ray.shutdown()          # no Ray work may run in the background while timing latency
    model.eval()
    lat = common.latency(lambda inp: model.forward(inp),
                         lambda bs: {k: v[:bs].contiguous() for k, v in batch.items()})

    res = {"name": "fuxictr", "version": fuxictr.__version__, "torch": torch.__version__,
           "device": str(model.device), "threads": threads,
           "train_rows": int(n_seen if args.max_steps else n_train), "test_rows": int(n_test),
           "prep_rows_per_s": (n_train + n_test) / t_prep, "prep_s": t_prep,
           **tr,
           "infer_samples_per_s": n_test / t_inf,
           "latency_ms": lat, **common.peak_rss(), **common.metrics(y_test, pred),
           "notes": "Criteo_x4-style CustomizedFeatureProcessor (I* log^2 buckets as categorical), "
                    "build_dataset (Ray) -> parquet -> RankDataLoader; model_zoo DeepFM from package layers"}
    common.emit(res, args)


if __name__ == "__main__":
    main()
