"""Run by test_compress under torchrun: a gradual family of a tiny model, two pruning steps per member,
with two processes. Every rank writes a digest of the last member's weights as it ended training
(rank 0: as saved) and how many CAP snapshot teachers it held at each training (with `cap`)."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_loaded_with_tokenizer  # noqa: E402
from ziplm_planner import recovery as recovery_module  # noqa: E402
from ziplm_planner.export import load_pruned  # noqa: E402
from ziplm_planner.pipeline import compress_model  # noqa: E402
from ziplm_planner.settings import CompressSettings, ContrastiveSettings, LossWeights, RecoverySettings, TrainSettings  # noqa: E402
from ziplm_planner.table import LatencyTable  # noqa: E402
from ziplm_planner.verify import MachineCheck  # noqa: E402

# as conftest holds it for the tests in-process: this machine measures as the table describes, whatever its load
MachineCheck.problems = lambda self, tolerance: []

folder = Path(sys.argv[1])
targets = [float(t) for t in sys.argv[2].split(",")]
followed = []
real_follow = recovery_module.Recovery.follow
recovery_module.Recovery.follow = lambda self: followed.append(real_follow(self))
snapshots_seen = []
real_train = recovery_module.Recovery._train
recovery_module.Recovery._train = lambda self, *args: snapshots_seen.append(len(self.snapshots)) or real_train(self, *args)

cap = sys.argv[3:] == ["cap"]
train = TrainSettings(tokens=1500, batch_size=4, learning_rate=1e-3,
                      weights=LossWeights(squarehead=1.0, contrastive=1.0 if cap else 0.0),
                      contrastive=ContrastiveSettings(teachers=("dense", "snapshots")))
settings = CompressSettings(num_samples=48, search_evaluations=4, score_samples=16, verify_rounds=3, max_replans=0,
                            onnx=False, cache_dir=folder / "cache", recovery=RecoverySettings("gradual", None, train, prune_steps=2))
report = compress_model(tiny_loaded_with_tokenizer("bert"), LatencyTable.load(folder / "table.json"), targets,
                        str(folder / "calib.txt"), folder / "family", settings)
if report is not None:
    rank, model = 0, load_pruned(folder / "family" / report.rows[-1]["folder"])
else:
    rank, model = 1, followed[-1]
digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in model.state_dict().values()))
(folder / f"rank{rank}.sha256").write_text(digest.hexdigest())
(folder / f"rank{os.environ['RANK']}.snapshots").write_text(json.dumps(snapshots_seen))
