from .errors import ActsparseError
