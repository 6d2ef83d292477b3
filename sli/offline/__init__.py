"""The offline path: everything that runs before inference and never during it.

- :mod:`sli.offline.sources`: model readers (safetensors, PyTorch .bin, GGUF), one tensor at a time;
- :mod:`sli.offline.config`: quantization modes, configs, mixed precision, the preset registry;
- :mod:`sli.offline.quantizer`: one tensor through the plan's codec, with its measured error;
- :mod:`sli.offline.writer`: the model, group by group, into the cache (resumable);
- :mod:`sli.offline.calibration`: calibration configs, the shipped text, samples and held-out tokens;
- :mod:`sli.offline.calibrate`: the writer's calibrated path, layer by layer (sequential GPTQ, AWQ),
  on :mod:`sli.offline.layerwalk` (one layer at a time in transformers' own modules) and
  :mod:`sli.offline.actstore` (activations between layers, committed with each layer);
- :mod:`sli.offline.gptq`, :mod:`sli.offline.awq`: the algorithms;
- :mod:`sli.offline.salience`: mixed precision chosen by measured salience, to a bits or a loss
  target (:mod:`sli.offline.lossprobe` measures candidates and held-out loss);
- :mod:`sli.offline.fetch`: the packaged test model, turned into a model folder.

It builds on :mod:`cache` (records, store) and :mod:`runtime` (architectures, memory
sampling); the processor and the CLI use it, nothing in it uses them.
"""
