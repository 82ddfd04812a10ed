#!/usr/bin/env python3
"""Prints the paths of the real photos used as fixtures, one per line: the ones that ship inside
scikit-image and matplotlib (installed in the project's venv)."""
import os

import matplotlib
import skimage.data

data = os.path.dirname(skimage.data.__file__)
for name in ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "camera.png"]:
    print(os.path.join(data, name))
print(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
