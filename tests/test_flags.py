"""model_kwargs -> command-line flags."""

from __future__ import annotations

import json

from infermill.servers.flags import has_flag, kwargs_to_flags


def test_true_gives_bare_flag():
    assert kwargs_to_flags({"enforce_eager": True}) == ["--enforce-eager"]


def test_false_gives_no_prefixed_flag():
    assert kwargs_to_flags({"enable_prefix_caching": False}) == ["--no-enable-prefix-caching"]


def test_none_is_left_out():
    assert kwargs_to_flags({"quantization": None}) == []
    assert kwargs_to_flags({"a": None, "b": 1}) == ["--b=1"]


def test_scalars_are_written_with_equals():
    assert kwargs_to_flags({"max_num_seqs": 256, "gpu_memory_utilization": 0.85, "dtype": "bfloat16"}) == [
        "--max-num-seqs=256",
        "--gpu-memory-utilization=0.85",
        "--dtype=bfloat16",
    ]


def test_zero_and_empty_string_are_values_not_booleans():
    assert kwargs_to_flags({"seed": 0, "chat_template": ""}) == ["--seed=0", "--chat-template="]


def test_lists_tuples_and_dicts_are_json_not_python_repr():
    flags = kwargs_to_flags(
        {
            "limit_mm_per_prompt": {"image": 2, "video": 0},
            "served_model_name": ["a", "b"],
            "cuda_graph_sizes": (1, 2),
            "hf_overrides": {"rope_scaling": {"type": "yarn", "factor": 4.0}, "flag": True, "none": None},
        }
    )
    assert flags[0] == '--limit-mm-per-prompt={"image":2,"video":0}'
    assert flags[1] == '--served-model-name=["a","b"]'
    assert flags[2] == "--cuda-graph-sizes=[1,2]"
    name, _, value = flags[3].partition("=")
    assert name == "--hf-overrides"
    assert json.loads(value) == {"rope_scaling": {"type": "yarn", "factor": 4.0}, "flag": True, "none": None}
    assert "True" not in value and "None" not in value and "'" not in value


def test_underscores_become_dashes_and_dashed_keys_are_kept():
    assert kwargs_to_flags({"max_model_len": 5, "kv-cache-dtype": "fp8"}) == [
        "--max-model-len=5",
        "--kv-cache-dtype=fp8",
    ]


def test_order_of_the_kwargs_is_kept():
    kwargs = {"z_last": 1, "a_first": True, "m_mid": False, "b": [1], "skipped": None, "c": "x"}
    assert kwargs_to_flags(kwargs) == ["--z-last=1", "--a-first", "--no-m-mid", "--b=[1]", "--c=x"]


def test_empty_kwargs_give_no_flags():
    assert kwargs_to_flags({}) == []


def test_has_flag_compares_underscores_and_dashes_alike():
    assert has_flag({"tensor_parallel_size": 2}, "tensor-parallel-size")
    assert has_flag({"tensor-parallel-size": 2}, "tensor_parallel_size")
    assert not has_flag({"tensor_parallel_size": 2}, "data-parallel-size")
    assert not has_flag(None, "tp-size")
