"""The resume protocol: what a fit writes so that running the same command again continues it, and what it refuses.

1. **Written by a run** (``marks``): every checkpoint stores the run folder that wrote it
   (``RUN_STATE_KEY``); while a fit runs, ``fit_running.json`` beside its ``last.ckpt`` names the
   process (host, pid, process start time, boot id); a fit that ends normally leaves
   ``fit_finished.json``. A SIGTERM saves ``last.ckpt`` at the next step boundary
   (``callbacks.resume.Resume``, which the CLI adds to every run). Marks are written atomically.
2. **Found before a fit** (``find``): the newest run whose saved config equals this one (launch-only
   keys ignored), when unfinished; in it, the checkpoint with the highest step that reads safely,
   is finite and is this run's own (what is skipped is said, with why); under SLURM, the newer of it
   and Lightning's ``hpc_ckpt_<n>.ckpt``.
3. **Read safely** (``checkpoints``): files with ``weights_only=True``; an FSDP2 folder's DCP
   metadata through an allow-list, every shard present and whole, before torch reads it. A file
   that names code (``UnsafeCheckpoint``) stops the launch; a cut one (``UnreadableCheckpoint``) is
   skipped.
4. **Refused** (``refusals``): a checkpoint holding NaN/inf is never written (every rank checks
   its part before any rank writes) nor resumed from; a run folder whose ``fit_running.json`` names
   a live process on this machine is not trained a second time (global rank 0 decides).

Lightning restores step, optimizer, LR scheduler and callback states (EMA) from the chosen
checkpoint. The Lightning side is thin: ``callbacks.resume.Resume`` writes the marks and the SIGTERM
checkpoint, ``lightning_modules.cli`` asks ``find.continue_from`` before a fit, and
``lightning_modules.checkpointing`` writes and reads through ``checkpoints`` and ``refusals``.
State a later resume must restore (a data stream's position) belongs in this protocol too.
"""
