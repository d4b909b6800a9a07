from .cifar_zip import CifarZipDataset, default_cifar10_zip
from .factory import create_dataset, resolve_num_classes
