"""megdet_tf: MegDet large mini-batch object detection in TensorFlow/Keras.

Model Garden (`official.vision`) is built on Keras 2 (`tf_keras`); setting
`TF_USE_LEGACY_KERAS` before TensorFlow is imported makes `tf.keras` resolve to
it everywhere in the project. TensorFlow's C++ logging (info to errors it
recovers from, such as grappler's cost estimates) is off unless
`TF_CPP_MIN_LOG_LEVEL` says otherwise: failures reach Python as exceptions.
"""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
