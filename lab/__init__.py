"""The demo's workbench: the grounded VQA benchmark, the training recipe and the reports.

Not part of the installed library (``flashvlm.demo`` holds only what ``flashvlm demo``
needs: the model definition, its assembly and the example scenes). One entry point,
run from the repository root: ``python -m lab {export,train,evaluate,report,diagnose,curves,speed,data-rate}``.

- :mod:`lab.scenes`: procedural scenes and questions, deterministic by seed;
- :mod:`lab.splits`: splits as JSONL + PNG rows, the token hit-rate geometry, ``hit_rates``;
- :mod:`lab.train`: the LLaVA recipe (contrastive tower, projector alignment, instruction tuning);
- :mod:`lab.report`: accuracy and the fidelity table, through ``flashvlm.eval``;
- :mod:`lab.diagnose`: what text relevance sees in a trained model.
"""
