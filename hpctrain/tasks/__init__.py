"""Built-in training tasks: each subpackage owns one task's data generator, model and loss;
volume_interpolation.py is an example device transform (dwi_ml's interpolation on the GPU)."""
