"""The README's main job (`./dev demo`) end to end, small: two nodes, one pod each."""
from lab.demo import run_demo


def test_demo_cluster_pods_and_service(capsys):
    assert run_demo(nodes=2) == 0
    out = capsys.readouterr().out
    assert "the Service answers from all 2 pods, by ClusterIP and by NodePort on every node" in out, out
    assert "NetworkPolicy: default-deny refuses, the allow rule answers" in out, out
    assert "agent logged: dropped ingress to default/node1-pod1 (" in out, out


def test_demo_in_calico_mode(capsys):
    assert run_demo(nodes=2, mode="calico") == 0
    out = capsys.readouterr().out
    assert "route reflector for every node" in out and "BGP-learned routes: 10.65." in out, out
    assert "the Service answers from all 2 pods" in out, out
