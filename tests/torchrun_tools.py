"""Run under torchrun by tests/test_evaluate.py: evaluate (the records sharded over the ranks), then Grad-CAM (rank 0
alone), in one launch and one process group.

usage: torchrun --nproc_per_node=2 tests/torchrun_tools.py EVALUATE_ARGS... -- GRADCAM_ARGS...
"""
import sys

from rsb_ffcv import distributed, evaluate, gradcam


def main():
    split = sys.argv.index("--")
    try:
        assert evaluate.run(sys.argv[1:split]) == 0
        assert gradcam.explain(sys.argv[split + 1:]) == 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
