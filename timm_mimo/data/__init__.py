from .cifar_zip import CifarZipDataset, default_cifar10_zip
from .corruptions import CorruptionDataset
from .digits import DigitsDataset
from .factory import create_dataset, native_img_size, resolve_num_classes
from .splits import DataSplits, build_splits, carve_validation
