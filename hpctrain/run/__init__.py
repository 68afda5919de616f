"""The run layer: the training loop and what it writes.

The loop (`trainer`) and its step (`step`), the task contract as the loop calls it and the parts a run receives
(`contract`), evaluation (`evaluate`), checkpoints (`checkpoint`), metrics.h5 (`metrics`), the built-in observers
(`observers`), the step-time breakdown (`breakdown`), freeze phases (`freeze`), torch.compile (`compile`), what a
resumed config may change (`resume_check`) and initial weights from another run (`fine_tune`). It imports the
data and process layers and the top-level contract modules (config, callbacks, transforms, optim, instantiate);
it never builds a user's component itself: hpctrain.components does, and hands the parts down.
"""
