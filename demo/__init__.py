"""The demo's workbench: the grounded VQA benchmark, the training recipe and the reports.

Not part of the installed library (``flashvlm.demo`` holds only what ``flashvlm demo``
needs: the model definition, its assembly and the example scenes). One entry point,
run from the repository root: ``python -m demo {export,train,evaluate,report,diagnose,data-rate}``.

- :mod:`demo.scenes`: procedural scenes and questions, deterministic by seed;
- :mod:`demo.data`: splits as JSONL + PNG rows, the token hit-rate geometry, ``hit_rates``;
- :mod:`demo.train`: the LLaVA recipe (contrastive tower, projector alignment, instruction tuning);
- :mod:`demo.report`: accuracy and the fidelity table, through ``flashvlm.eval``;
- :mod:`demo.diagnose`: what text relevance sees in a trained model.
"""
