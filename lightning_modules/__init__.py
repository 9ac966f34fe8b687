"""The classes experiments name in YAML: the three InstaFlow stages and the CLI entry.

- ``couplings.CouplingGeneration``: stage 1 (and the 2-RF's couplings), solving a model's ODE;
- ``student.FlowStudent``: what reflow and distillation share; ``reflow.ReflowTraining`` (stage 2)
  and ``distill.DistillTraining`` (stage 3) each add their ``loss``;
- ``embedded/``: the trainers of the embedded world's teacher, VAE and evaluator;
- ``cli``: LightningCLI over these modules, configured by experiments/*.yaml.

These modules orchestrate; the math and the models they use live in the ``instaflow`` library.
"""
