#!/usr/bin/env python3
"""torchrec 1.8.0 DeepFM peer runner.  Run with bench/.envs/torchrec/bin/python.

Preprocessing = torchrec's own Criteo utilities (torchrec.datasets.criteo):
  * BinaryCriteoUtils.tsv_to_npys(tsv) for the train and the test file: row
    by row, missing -> 0; dense = log(x - min(file) + 2) (i.e. log(x + 5)
    when the file's minimum is -3, as in Criteo); categorical = int(hex, 16);
    saved as .npy (in bench/.out/torchrec/).
  * InMemoryBinaryCriteoIterDataPipe(stage="train", batch_size=4096,
    hashes=[100000] * 26): loads the .npy files, takes categorical ids
    modulo 100,000 per feature (the DLRM example's default
    --num_embeddings 100_000) and yields Batch(dense, KeyedJaggedTensor,
    labels).  No shuffling (the datapipe's default; the data is i.i.d.).
Model: torchrec.models.deepfm.SimpleDeepFMNN over an EmbeddingBagCollection
(26 tables, 100,000 x 16, one feature each):
  dense_arch: 13 -> hidden_layer_size (400) -> 16, projecting the numerics to
    one extra 16-d "field";
  inter_arch: torchrec.modules.deepfm.DeepFM (deep part) +
    FactorizationMachine, both over the 27 x 16 embeddings.  NOTE:
    torchrec's FactorizationMachine flattens [B, F, D] to [B, F*D] before
    its sum-square trick, so its "FM" term is 0.5*((sum of all F*D entries)^2
    - sum of squares) -- not the per-dimension pairwise <v_i, v_j> of the
    DeepFM paper.  It is used as is.  There is no first-order (linear) term.
  over_arch: Linear(16 + 400 + 1 -> 1) + Sigmoid.
  --variant mlp3 (default): SimpleDeepFMNN with its deep module
    (inter_arch.deep_fm.dense_module, by default a single Linear+ReLU of
    width deep_fm_dimension) replaced by torchrec.modules.mlp.MLP(432,
    [400, 400, 400]), so the DNN is 400-400-400 like the other peers.
  --variant simple: SimpleDeepFMNN exactly as shipped (deep part = one
    Linear(432 -> 400) + ReLU).
Training: plain PyTorch loop (torchrec has no fit()), nn.BCELoss on the
sigmoid output, torch.optim.Adam(model.parameters(), lr=1e-3).  The
EmbeddingBagCollection is unsharded, so embedding gradients are dense and Adam
updates all 26 x 100,000 x 16 table rows every step (torchrec's fused sparse
optimizers need DistributedModelParallel/fbgemm TBE sharding, not used here).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.claim_stdout()

import numpy as np  # noqa: E402


def main():
    ap = common.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["mlp3", "simple"], default="mlp3")
    ap.add_argument("--num-embeddings", type=int, default=100_000)
    args = ap.parse_args()
    threads = common.setup_torch(args)
    import torch
    from torch import nn
    import torchrec
    from torchrec.datasets.criteo import (DEFAULT_CAT_NAMES, BinaryCriteoUtils,
                                          InMemoryBinaryCriteoIterDataPipe)
    from torchrec.models.deepfm import SimpleDeepFMNN
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.modules.mlp import MLP

    device = torch.device("cuda:0" if args.device.startswith("cuda") else "cpu")
    work = common.workdir(args, "torchrec")

    # ---------------------------------------------------------------- prep
    t0 = time.perf_counter()
    paths = {}
    for split, src in (("train", args.train), ("test", args.test)):
        p = {k: os.path.join(work, f"{split}_{k}.npy") for k in ("dense", "sparse", "labels")}
        BinaryCriteoUtils.tsv_to_npys(src, p["dense"], p["sparse"], p["labels"], dataset_name="criteo_1tb")
        paths[split] = p
    hashes = [args.num_embeddings] * len(DEFAULT_CAT_NAMES)

    def datapipe(split, bs):
        p = paths[split]
        return InMemoryBinaryCriteoIterDataPipe(stage="train", dense_paths=[p["dense"]], sparse_paths=[p["sparse"]],
                                                labels_paths=[p["labels"]], batch_size=bs, rank=0, world_size=1,
                                                hashes=hashes)
    train_dp = datapipe("train", args.batch_size)
    test_dp = datapipe("test", 4096)
    t_prep = time.perf_counter() - t0
    n_train = int(sum(train_dp.num_rows_per_file))
    n_test = int(sum(test_dp.num_rows_per_file))

    # ---------------------------------------------------------------- model
    D = args.embedding_dim
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{f}", embedding_dim=D, num_embeddings=args.num_embeddings,
                                   feature_names=[f]) for f in DEFAULT_CAT_NAMES],
        device=device)
    model = SimpleDeepFMNN(num_dense_features=13, embedding_bag_collection=ebc, hidden_layer_size=400,
                           deep_fm_dimension=400)
    if args.variant == "mlp3":
        fm_in = D * (len(DEFAULT_CAT_NAMES) + 1)
        model.inter_arch.deep_fm.dense_module = MLP(in_size=fm_in, layer_sizes=[400, 400, 400], device=device)
    model = model.to(device)
    loss_fn = nn.BCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    timer = common.StepTimer(opt, args.batch_size)

    model.train()
    timer.start()
    for step, batch in enumerate(train_dp):
        batch = batch.to(device)
        pred = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = loss_fn(pred, batch.labels.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.max_steps and step + 1 >= args.max_steps:
            break
    n_seen = min(n_train, len(timer.stamps) * args.batch_size)
    tr = timer.summary(n_seen)
    timer.restore()

    # ---------------------------------------------------------------- inference
    model.eval()

    def predict():
        preds, labels = [], []
        with torch.no_grad():
            for batch in test_dp:
                batch = batch.to(device)
                preds.append(model(batch.dense_features, batch.sparse_features).reshape(-1).cpu().numpy())
                labels.append(batch.labels.reshape(-1).cpu().numpy())
        return np.concatenate(preds), np.concatenate(labels)

    (pred, y_test), t_inf = common.timed_passes(predict)

    dense, sparse, lab = test_dp.dense_arrs[0], test_dp.sparse_arrs[0], test_dp.labels_arrs[0]

    def make_input(bs):
        b = test_dp._np_arrays_to_batch(dense[:bs], sparse[:bs], lab[:bs]).to(device)
        return (b.dense_features, b.sparse_features)

    lat = common.latency(lambda inp: model(*inp), make_input)

    res = {"name": "torchrec", "version": torchrec.__version__, "torch": torch.__version__,
           "device": str(device), "threads": threads, "variant": args.variant,
           "train_rows": int(n_seen), "test_rows": n_test,
           "prep_rows_per_s": (n_train + n_test) / t_prep, "prep_s": t_prep,
           **tr,
           "infer_samples_per_s": n_test / t_inf,
           "latency_ms": lat, **common.peak_rss(), **common.metrics(y_test, pred),
           "notes": "tsv_to_npys (log dense, hex ids) + InMemoryBinaryCriteoIterDataPipe(hashes=1e5); "
                    "SimpleDeepFMNN (flattened-FM, no linear term)"
                    + (" with deep module = MLP 400-400-400" if args.variant == "mlp3" else " as shipped")
                    + "; unsharded EBC, dense Adam"}
    common.emit(res, args)


if __name__ == "__main__":
    main()
