#!/usr/bin/env python3
"""DeepCTR-Torch 0.3.0 DeepFM peer runner.  Run with bench/.envs/deepctr/bin/python.

Preprocessing = DeepCTR-Torch's Criteo example (examples/run_classification_criteo.py):
  * C1..C26: fillna('-1') then sklearn LabelEncoder per column.  Here the
    encoder is fitted on the TRAIN file only; train codes are shifted by +1 and
    test values unseen in train map to 0 (vocabulary_size = #train classes + 1).
  * I1..I13: fillna(0) then sklearn MinMaxScaler(feature_range=(0, 1)) fitted on
    train (test transformed with the train scaler, not clipped).
  * Feature columns: SparseFeat(C*, vocab, embedding_dim=16) + DenseFeat(I*, 1),
    used for both the linear and the DNN part, as in the example.
Model: deepctr_torch.models.DeepFM(linear, dnn, task='binary',
  dnn_hidden_units=(400, 400, 400)); all other arguments at the library
  defaults (l2_reg_embedding=1e-5, l2_reg_linear=1e-5, init_std=1e-4,
  no dropout/BN).  model.compile('adam', 'binary_crossentropy') -> torch Adam
  with lr 1e-3 (DeepCTR's 'adam' default).  model.fit(x, y, batch_size=4096,
  epochs=1, verbose=0, shuffle=True) -- verbose=0 so that fit does not compute
  per-batch train metrics.
Timing: per-step throughput is measured by wrapping model.optim.step with a
timestamp (common.StepTimer); fit itself is unmodified.  --max-steps N trains
fit() on the first N*batch rows of the (already shuffled-by-fit) train data.
Inference: model.predict(x_test, batch_size=4096).  Latency: model(X) where X is
the concatenated encoded input tensor that DeepCTR's fit/predict feed the model.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.claim_stdout()   # deepctr prints to stdout (version check, fit banner)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def read_tsv(path):
    dtypes = {"label": np.int64, **{c: np.float64 for c in common.INT_COLS}, **{c: str for c in common.CAT_COLS}}
    return pd.read_csv(path, sep="\t", header=None, names=common.COLUMNS, dtype=dtypes)


def main():
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    threads = common.setup_torch(args)
    import torch
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM
    from sklearn.preprocessing import LabelEncoder, MinMaxScaler

    # ---------------------------------------------------------------- prep
    t0 = time.perf_counter()
    train = read_tsv(args.train)
    test = read_tsv(args.test)
    train[common.CAT_COLS] = train[common.CAT_COLS].fillna("-1")
    test[common.CAT_COLS] = test[common.CAT_COLS].fillna("-1")
    train[common.INT_COLS] = train[common.INT_COLS].fillna(0)
    test[common.INT_COLS] = test[common.INT_COLS].fillna(0)
    vocab = {}
    for feat in common.CAT_COLS:
        lbe = LabelEncoder()
        train[feat] = lbe.fit_transform(train[feat]) + 1
        classes = lbe.classes_
        v = test[feat].to_numpy()
        pos = np.searchsorted(classes, v)
        pos_c = np.minimum(pos, len(classes) - 1)
        test[feat] = np.where(classes[pos_c] == v, pos_c + 1, 0)       # unseen -> 0
        vocab[feat] = len(classes) + 1
    mms = MinMaxScaler(feature_range=(0, 1))
    train[common.INT_COLS] = mms.fit_transform(train[common.INT_COLS])
    test[common.INT_COLS] = mms.transform(test[common.INT_COLS])
    fixlen = [SparseFeat(f, vocab[f], embedding_dim=args.embedding_dim) for f in common.CAT_COLS] + \
             [DenseFeat(f, 1) for f in common.INT_COLS]
    linear_cols, dnn_cols = fixlen, fixlen
    names = get_feature_names(linear_cols + dnn_cols)
    n_prep_rows = len(train) + len(test)
    if args.max_steps:
        train = train.iloc[: args.max_steps * args.batch_size]
    x_train = {n: train[n].values for n in names}
    y_train = train["label"].values
    x_test = {n: test[n].values for n in names}
    y_test = test["label"].values
    t_prep = time.perf_counter() - t0

    # ---------------------------------------------------------------- model
    device = args.device if args.device == "cpu" else "cuda:0"
    model = DeepFM(linear_feature_columns=linear_cols, dnn_feature_columns=dnn_cols, task="binary",
                   dnn_hidden_units=(400, 400, 400), device=device)
    model.compile("adam", "binary_crossentropy")
    for g in model.optim.param_groups:
        g["lr"] = args.lr            # 1e-3 == DeepCTR's 'adam' default; kept explicit for --lr
    timer = common.StepTimer(model.optim, args.batch_size)
    timer.start()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=1, verbose=0)
    tr = timer.summary(len(y_train))
    timer.restore()

    # ---------------------------------------------------------------- inference
    pred, t_inf = common.timed_passes(lambda: model.predict(x_test, batch_size=4096))
    X = torch.from_numpy(np.concatenate([np.asarray(x_test[f]).reshape(-1, 1) for f in model.feature_index], axis=-1)).float().to(device)
    model.eval()
    lat = common.latency(lambda inp: model(inp), lambda bs: X[:bs].contiguous())

    res = {"name": "deepctr-torch", "version": deepctr_torch.__version__, "torch": torch.__version__,
           "device": device, "threads": threads,
           "train_rows": int(len(y_train)), "test_rows": int(len(y_test)),
           "prep_rows_per_s": n_prep_rows / t_prep,
           "prep_s": t_prep,
           **tr,
           "infer_samples_per_s": len(y_test) / t_inf,
           "latency_ms": lat, **common.peak_rss(), **common.metrics(y_test, pred),
           "notes": "LabelEncoder(train, unseen->0) + MinMaxScaler; DeepFM dnn (400,400,400), library defaults otherwise"}
    common.emit(res, args)


if __name__ == "__main__":
    main()
