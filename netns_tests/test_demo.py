"""The README's main job (`./dev demo`) end to end, small: two nodes, one pod each."""
from podnet.demo import run_demo


def test_demo_cluster_pods_and_service(capsys):
    assert run_demo(nodes=2) == 0
    out = capsys.readouterr().out
    assert "the Service answers from all 2 pods, by ClusterIP and by NodePort on every node" in out, out
