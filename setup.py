"""lungct: 3D CNNs on lung CT volumes with JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="lungct",
    version="0.1.0",
    description="Train and evaluate 3D convolutional networks on lung CT volumes (JAX/Flax NNX).",
    packages=find_packages(include=["lungct", "lungct.*"]),
    # The oneDNN convolution extension's source: compiled on first use (lungct/ops/build.py), not here, so
    # installing needs no compiler and the extension matches the jaxlib actually imported.
    package_data={"lungct.ops": ["csrc/*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "nibabel>=5.0",
        "pydicom>=3.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "grain>=0.2.10",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "psutil>=5.9",
        # oneDNN (library + headers, CPU-only build with GNU OpenMP, ~40 MB) for conv_impl="onednn".
        "onednn-cpu-gomp==2023.2.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "onednn-devel-cpu-gomp==2023.2.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # Apache Beam is in "test" so the DirectRunner build test runs in CI (tests/test_beam_build.py).
        "test": ["pytest>=8", "scikit-learn>=1.4", "apache-beam>=2.60"],
        "beam": ["apache-beam>=2.60"],   # data.beam_options: build datasets on Beam (Dataflow, Spark, Flink)
        "bench": ["torch==2.13.0", "monai==1.6.1"],
        "docs": ["jupytext", "nbclient", "ipykernel", "nbconvert"],  # regenerate docs/tutorial.ipynb and .md
    },
)
