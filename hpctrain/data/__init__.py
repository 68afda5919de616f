"""The data layer: how samples get from HDF5 files to batches of named tensors.

The built-in HDF5 dataset, the batch reader, the samplers and the train/validation split (`dataset`), fast row
reads of one HDF5 dataset (`hdf5_reader`), atomic parallel writes of generated files (`hdf5_writer`) and the loaders
that hand batches to the loop, in the process or from workers (`loader`). It imports hpctrain.config,
hpctrain.transforms and the process layer, nothing of the loop above it.

`hpctrain.data.HDF5Dataset` is the `_target_` the configs name.
"""

from hpctrain.data.dataset import HDF5Dataset

__all__ = ["HDF5Dataset"]
