"""A helper module outside the working dir (found through ``PYTHON_PATH``)."""


def loss(epoch):
    return 1.0 / (epoch + 1)
