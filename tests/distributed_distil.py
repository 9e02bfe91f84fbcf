"""Run by test_train under torchrun: every rank distils the same tiny student and writes a digest
of its final weights."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_train import settings, tiny_data, tiny_pair  # noqa: E402
from ziplm_planner.kinds import EMBEDDING  # noqa: E402
from ziplm_planner.train import distil, make_accelerator  # noqa: E402

accelerator = make_accelerator(cpu=True)
student, teacher = tiny_pair()
record = distil(student, teacher, EMBEDDING, tiny_data(), settings(), accelerator)
assert accelerator.num_processes == 2, accelerator.num_processes
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in student.state_dict().values())).hexdigest()
(Path(sys.argv[1]) / f"rank{accelerator.process_index}.sha256").write_text(digest)
