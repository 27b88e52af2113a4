from setuptools import find_packages, setup

setup(
    name="llada-pretrain",
    version="0.1.0",
    description="Pretraining large language diffusion models (LLaDA) with DeepSpeed ZeRO-3",
    packages=find_packages(include=["pretrain", "pretrain.*", "data_pipeline", "data_pipeline.*", "launch", "launch.*"]),
    python_requires=">=3.10",
    # torch is a range that the CPU build 2.13.0 satisfies; `make install` puts that build in first
    # where no torch is present, so pip never pulls a multi-GB CUDA build onto a CPU machine.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "webdataset>=1.0,<2",
        "hydra-core>=1.3,<1.4",
        "wandb>=0.17",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyarrow>=14",
        "zstandard>=0.22",
        "psutil>=5.9",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        # Using a trained model: AutoModel loading of exports (their modeling code is shipped with each) and
        # lm-evaluation-harness (python -m pretrain.lm_eval). Not needed to train. Exports load in
        # transformers 5 too; why this extra stays below 5: docs/using_a_model.md, "Which transformers".
        "hf": ["transformers>=4.57,<5", "lm-eval>=0.4.13,<0.5"],
    },
)
