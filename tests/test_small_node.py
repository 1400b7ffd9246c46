"""The small-node Ray settings: filled in where unset, a user's own choice kept."""

from ct3dflow.adapters.small_node import SMALL_NODE_ENV, use_small_node_settings


def test_fills_what_is_unset_and_keeps_what_the_user_chose():
    env = {"RAY_enable_metrics_collection": "true", "PATH": "/bin"}
    use_small_node_settings(env)
    assert env["RAY_enable_metrics_collection"] == "true"  # the user's value wins
    assert env["PATH"] == "/bin"
    for k, v in SMALL_NODE_ENV.items():
        if k != "RAY_enable_metrics_collection":
            assert env[k] == v
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
