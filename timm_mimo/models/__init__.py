"""Importing this package registers every timm_mimo model in timm's registry."""
from .mixmo_resnets import *
from .mixvit import *
from .mimo_backbone import *
