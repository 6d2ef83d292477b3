"""Layer 1: what the GPU path decides without a GPU: the two-budget plan (GPU memory and host
memory, neither exceeded) and the copy schedule (the next layer's copy overlaps this layer's
compute; no slot is overwritten while a layer computes from it), driven by a simulated device."""

import random

import pytest

from runtime.budget import BudgetTooSmallError
from runtime.copysched import LayerPipeline
from runtime.devplan import DeviceUnit, plan_two_budgets

MB = 1_000_000


def _units(n, device=100 * MB, transfer=30 * MB, stored=28 * MB):
    return [DeviceUnit(f"layer.{i}", device, transfer, stored) for i in range(n)]


def test_everything_on_the_gpu_when_it_fits():
    p = plan_two_budgets(_units(4), gpu_budget=500 * MB, host_budget=100 * MB, gpu_fixed={"kv": 50 * MB}, host_fixed={})
    assert p.gpu_resident == tuple(f"layer.{i}" for i in range(4)) and not p.streaming
    assert p.pcie_bytes_per_pass == 0 and p.gpu_planned_bytes == 450 * MB


def test_gpu_then_pinned_host_then_disk():
    units = _units(10)
    # GPU: 100 fixed + 2 slots of 130 = 360 minimum; 240 more holds 2 layers
    # host: 2 staging buffers of 30 = 60; 100 more pins 3 layers' records
    p = plan_two_budgets(units, gpu_budget=600 * MB, host_budget=160 * MB, gpu_fixed={"kv": 100 * MB}, host_fixed={})
    assert len(p.gpu_resident) == 2 and len(p.host_resident) == 3 and len(p.disk_streamed) == 5
    assert p.gpu_planned_bytes <= p.gpu_budget_bytes and p.host_planned_bytes <= p.host_budget_bytes
    assert p.pcie_bytes_per_pass == 8 * 30 * MB  # quantized size crosses PCIe, never the compute form
    assert p.disk_bytes_per_pass == 5 * 28 * MB
    assert "2 layers resident" in p.describe()


def test_budgets_too_small_say_the_minimum_and_the_option():
    with pytest.raises(BudgetTooSmallError, match=r"GPU budget .* below the 343.3 MiB .* --gpu-budget 360MB"):
        plan_two_budgets(_units(10), gpu_budget=300 * MB, host_budget=1000 * MB, gpu_fixed={"kv": 100 * MB}, host_fixed={})
    with pytest.raises(BudgetTooSmallError, match=r"host memory budget .* pinned staging .* --memory-budget 60MB"):
        plan_two_budgets(_units(10), gpu_budget=600 * MB, host_budget=50 * MB, gpu_fixed={"kv": 100 * MB}, host_fixed={})
    with pytest.raises(BudgetTooSmallError, match="--memory-budget 70MB"):
        plan_two_budgets(_units(2), gpu_budget=10_000 * MB, host_budget=60 * MB, gpu_fixed={}, host_fixed={"import": 70 * MB})


def test_plans_never_exceed_either_budget():
    rng = random.Random(0)
    for _ in range(500):
        units = [DeviceUnit(f"layer.{i}", rng.randint(1, 300) * MB, t := rng.randint(1, 100) * MB, rng.randint(1, t // MB) * MB)
                 for i in range(rng.randint(1, 40))]
        kw = dict(gpu_budget=rng.randint(100, 8000) * MB, host_budget=rng.randint(50, 4000) * MB,
                  gpu_fixed={"kv": rng.randint(0, 500) * MB}, host_fixed={"base": rng.randint(0, 300) * MB},
                  num_slots=rng.choice([2, 3]))
        try:
            p = plan_two_budgets(units, **kw)
        except BudgetTooSmallError:
            continue
        assert p.gpu_planned_bytes <= p.gpu_budget_bytes and p.host_planned_bytes <= p.host_budget_bytes
        assert sorted(p.gpu_resident + p.host_resident + p.disk_streamed) == sorted(u.name for u in units)


class SimDevice:
    """Two streams in simulated time: the side stream copies, the compute stream computes;
    events are completion times. Checks every slot read against the writes into it."""

    def __init__(self, copy_s: float, compute_s: float) -> None:
        self.copy_s, self.compute_s = copy_s, compute_s
        self.side = self.compute = 0.0
        self.waiting = 0.0
        self.writes: dict[int, list[tuple[float, float, int]]] = {}  # slot -> (start, end, layer)
        self.reads: list[tuple[int, int, float, float]] = []  # (layer, slot, start, end)

    def copy(self, layer, slot, after):
        start = max(self.side, after or 0.0)
        self.side = start + self.copy_s
        self.writes.setdefault(slot, []).append((start, self.side, layer))
        return self.side

    def wait(self, event):
        self.waiting = max(self.waiting, event)

    def record_compute(self):
        return self.compute

    def run(self, layer, slot):
        start = max(self.compute, self.waiting)
        self.compute = start + self.compute_s
        self.reads.append((layer, slot, start, self.compute))

    def check(self):
        for layer, slot, start, end in self.reads:
            done = [w for w in self.writes[slot] if w[1] <= start]
            assert done and done[-1][2] == layer, f"layer {layer} read slot {slot} holding {done[-1][2] if done else None}"
            assert not any(w[0] < end and w[1] > start for w in self.writes[slot]), f"slot {slot} written while layer {layer} ran"


@pytest.mark.parametrize("copy_s, compute_s, slots", [(1.0, 1.0, 2), (2.0, 1.0, 2), (1.0, 3.0, 2), (1.0, 1.0, 3)])
def test_copy_schedule_overlaps_and_never_overwrites_a_slot_in_use(copy_s, compute_s, slots):
    order = [0, 2, 3, 5, 7, 8]  # the streamed layers; the others are resident
    dev = SimDevice(copy_s, compute_s)
    pipe = LayerPipeline(dev, order, num_slots=slots)
    passes = 3
    for _ in range(passes):
        for layer in order:
            slot = pipe.before(layer)
            dev.run(layer, slot)
            pipe.after(layer, slot)
    dev.check()
    n = passes * len(order)
    serial = n * (copy_s + compute_s)
    bound = n * max(copy_s, compute_s) + min(copy_s, compute_s)  # perfect overlap: the slower side, plus one start-up
    assert dev.compute <= bound + 1e-9 and dev.compute < serial


def test_cuda_without_a_gpu_is_a_clear_error(tiny_llama, tmp_path, capsys):
    import torch

    from runtime.cuda import CudaUnavailableError
    from sli.cli import main
    from sli.processor import UniversalSLIProcessor

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(CudaUnavailableError, match="sees no CUDA device.*device='cpu'"):
        UniversalSLIProcessor(tiny_llama, device="cuda", gpu_budget="1GB", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        UniversalSLIProcessor(tiny_llama, device="tpu", cache_dir=tmp_path)
    assert main(["generate", str(tiny_llama), "--prompt", "hi", "--device", "cuda", "--gpu-budget", "1GB",
                 "--cache", str(tmp_path)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["none", "int8", "nf4", "int4"])
def test_record_layout_round_trips_a_layer_through_one_flat_buffer(tiny_llama, tmp_path, mode):
    """What the CUDA path copies over PCIe: a layer's records packed into one flat buffer
    (pinned staging, then the GPU slot) and read back as views decode to the same weights."""
    import torch

    from cache.codecs import decode_tensor
    from cache.manifest import layer_group
    from cache.store import LayerStore
    from runtime.cuda import RecordLayout
    from sli.processor import UniversalSLIProcessor
    from sli.quantization import QuantizationConfig

    vid = UniversalSLIProcessor(tiny_llama, quantization_config=QuantizationConfig(mode=mode, group_size=32), cache_dir=tmp_path,
                                progress=False).quantize().variant_id
    with LayerStore(tmp_path, readonly=True) as st, st.reader() as r:
        g = st.require_manifest(vid).groups[2]
        assert g.name == layer_group(1)
        encoded = {t.name: r.get(vid, t.name) for t in g.tensors}
        lay = RecordLayout.of({t.name: r.header(vid, t.name) for t in g.tensors})
        assert lay.nbytes >= sum(e.nbytes for e in encoded.values())
        buf = torch.full((lay.nbytes,), 0xAB, dtype=torch.uint8)
        lay.fill(buf, encoded)
        for name, view in lay.views(buf).items():
            assert torch.equal(decode_tensor(view, torch.float32), decode_tensor(encoded[name], torch.float32)), name


def _device_model(path, cache, mode, gpu_budget, host_budget="1GB", dtype=None):
    import torch

    from cache.store import LayerStore
    from runtime.cuda import CudaStreamingModel
    from sli.processor import UniversalSLIProcessor
    from sli.quantization import QuantizationConfig

    vid = UniversalSLIProcessor(path, quantization_config=QuantizationConfig(mode=mode, group_size=32), cache_dir=cache,
                                progress=False).quantize().variant_id
    store = LayerStore(cache, readonly=True)
    m = CudaStreamingModel(store, vid, gpu_budget=gpu_budget, memory_budget=host_budget, dtype=dtype or torch.float32,
                           context_tokens=128, device="cpu")
    return m, store


@pytest.mark.parametrize("where", ["all on the device", "half", "none, pinned on the host", "none, from disk"])
def test_device_path_on_cpu_equals_the_reference(tmp_path, where):
    """The device path with synchronous copies (what runs without a GPU): records staged,
    copied into slots, decoded there, layers run through the copy schedule; mode none in
    fp32 gives transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model

    path = make_tiny_model(tmp_path, "llama", layers=12, seed=31)  # half resident must be less than all: a slot holds two layers' worth
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids).logits
    probe, store = _device_model(path, tmp_path / "c", "none", "64GB")
    fixed, n = sum(probe.plan.gpu_fixed.values()), len(probe.layers)
    layer = probe.plan.gpu_resident_bytes // n
    slot = layer + max(lay.nbytes for lay in probe.layouts.values())
    probe.close()
    store.close()
    gpu, host, want = {
        "all on the device": ("64GB", "1GB", (n, 0)),
        "half": (fixed + 2 * slot + (n // 2) * layer, "1GB", (n // 2, n - n // 2)),
        "none, pinned on the host": (fixed + 2 * slot, "1GB", (0, n)),
        "none, from disk": (fixed + 2 * slot, 2 * max(lay.nbytes for lay in probe.layouts.values()), (0, 0)),
    }[where]
    m, store = _device_model(path, tmp_path / "c", "none", gpu, host)
    assert (len(m.plan.gpu_resident), len(m.plan.host_resident)) == want
    for _ in range(2):  # a second pass reuses the slots
        got = m.logits(ids)
        assert (got - ref).abs().max().item() < 1e-4
    assert m.stats.layers_loaded == 2 * (n - want[0])
    assert m.stats.bytes_read > 0 if where == "none, from disk" else m.stats.bytes_read == 0
    m.close()
    store.close()


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "nf4", "int4"])
def test_device_path_on_cpu_quantized_equals_the_dequantized_reference(tmp_path, mode):
    import torch

    from conftest import dequantized_reference, make_tiny_model

    path = make_tiny_model(tmp_path, "llama", layers=4, seed=32)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
    probe, store = _device_model(path, tmp_path / "c", mode, "64GB")
    n = len(probe.layers)
    minimum = sum(probe.plan.gpu_fixed.values()) + 2 * (probe.plan.gpu_resident_bytes // n + max(x.nbytes for x in probe.layouts.values()))
    probe.close()
    store.close()
    m, store = _device_model(path, tmp_path / "c", mode, minimum, "1GB")
    assert not m.plan.gpu_resident  # everything streams through the slots
    ref_model = dequantized_reference(path, store, m.variant_id)
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (m.logits(ids) - ref).abs().max().item() < 1e-4
    m.close()
    store.close()


def test_device_path_generates_the_same_tokens_with_the_paged_kv(tmp_path):
    """Generation over the device path (the KV pool on the model's device) gives the tokens
    the CPU streaming model gives, with and without prefix reuse."""
    import torch

    from conftest import make_tiny_model
    from runtime.executor import StreamingModel
    from runtime.generate import SamplingConfig, generate
    from runtime.kv import prefix_session_for

    path = make_tiny_model(tmp_path, "llama", layers=4, seed=33)
    m, store = _device_model(path, tmp_path / "c", "int8", "64GB")
    ref = StreamingModel(store, m.variant_id, memory_budget="1GB", dtype=torch.float32, context_tokens=128)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]])
    cfg = SamplingConfig(max_new_tokens=6)
    want = generate(ref, prompt, cfg).token_ids
    assert generate(m, prompt, cfg).token_ids == want
    session = prefix_session_for(m)
    assert session.pool.data.device == m.device
    first = generate(m, prompt, cfg, prefix_cache=session)
    again = generate(m, prompt, cfg, prefix_cache=session)
    assert first.token_ids == again.token_ids == want and again.stats.cached_tokens == 16
    ref.close()
    m.close()
    store.close()
