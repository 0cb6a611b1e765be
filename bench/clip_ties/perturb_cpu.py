import torch
from llmc_ray.worker import BlockWorker, WorkerPlan, CalibJob
from llmc_ray.checkpoint import resolve_model_dir
from llmc_ray.quant.quantizer import QuantSpec
torch.set_num_threads(1)
d = resolve_model_dir("/root/.cache/llmc_ray/assets/SmolLM2-135M-Instruct.Q4_1.gguf")
w = BlockWorker(WorkerPlan(0, (0,1,2), True, False, str(d), "llama", "float32", "cpu", 1)); w.load()
ids = torch.randint(0, 49152, (4, 512), generator=torch.Generator().manual_seed(0))
acts = w.calib_inputs(ids, 1)
acts = [w._to_cpu(w._run_block(w.blocks[0], w._to_dev(acts)))][0]
acts = [w._to_cpu(w._run_block(w.blocks[1], w._to_dev(acts)))][0]
import copy
state = copy.deepcopy(w.blocks[2].state_dict())
for eps in (0.0, 1e-6):
    w.blocks[2].load_state_dict(state)
    pert = [a * (1 + eps * torch.randn_like(a)) for a in acts]
    _, rep = w.calibrate_block(2, pert, CalibJob("Awq", {"clip_sym": True}, QuantSpec(4, False, "per_group", 64), True))
    print(eps, rep["info"]["ratios"], {k: round(v, 3) for k, v in rep["info"]["clipped_frac"].items()})
