"""Custom operations: oneDNN 3D convolutions on CPU (`lungct.ops.onednn_conv`)."""
