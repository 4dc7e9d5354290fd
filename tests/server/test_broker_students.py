"""A broker over a teacher node and a distilled student node (issue 15, mixed fleets).

Real node daemons on loopback (tiny model). A student whose image embeddings the broker
verified with its calibration crops is merged by score with the teacher nodes; one that
disagrees, or one the broker has no crops for, is fused by rank; coverage says which."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from broker_fixtures import OPERATOR_TOKEN, broker_config, crop
from jinja2 import Environment, FileSystemLoader

from common.distill import make_student, save_student
from common.errors import ConfigError
from common.preprocess import load_image
from protos import broker_pb2, node_pb2, node_pb2_grpc
from server.broker.config import StudentSettings, load_broker_config
from server.broker.students import mean_cosine
from server.console.results import coverage_view
from server.operator.output import coverage_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NODE_TOKEN = "node-token"
AUTH = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
QUERY = "a woman in a red jacket and black trousers"


@pytest.fixture
def crops_dir(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    for i in range(6):
        (folder / f"crop_{i}.png").write_bytes(crop(100 + i))
    return folder


def agreeing_student(teacher, out):
    """The teacher's own image tower under a student's name: cosine 1, another version."""
    student = make_student(teacher, teacher.spec["image"])
    student.image_tower.load_state_dict(teacher.image_tower.state_dict())
    student.image_proj.load_state_dict(teacher.image_proj.state_dict())
    return save_student(student, out)


def random_student(teacher, out):
    cnn = {"type": "cnn", "widths": [8, 8], "depths": [1, 1], "groups": 4}
    return save_student(make_student(teacher, cnn), out)


@contextlib.contextmanager
def serve_nodes(tmp_path, models: dict[str, str], per_node: int = 6):
    """Real node daemons, one per (node id, model spec), each with its own crops."""
    from edge_node.config import AuthSettings, IndexSettings, NodeConfig
    from edge_node.serving.daemon import create_server, shutdown

    started, galleries = [], {}
    for n, (node_id, model) in enumerate(models.items()):
        config = NodeConfig(
            node_id=node_id,
            data_dir=tmp_path / node_id,
            listen="127.0.0.1:0",
            model=model,
            index=IndexSettings(embed_batch_size=8, save_interval_s=0.0),
            auth=AuthSettings(token=NODE_TOKEN),
            grace_s=1.0,
        )
        server, port, node = create_server(config)
        server.start()
        started.append((server, node))
        items = [
            node_pb2.ImageItem(data=crop(n * per_node + i), camera_id="cam0", timestamp_ms=i + 1)
            for i in range(per_node)
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = node_pb2_grpc.NodeServiceStub(channel).Ingest(
                node_pb2.IngestRequest(images=items),
                metadata=[("authorization", f"Bearer {NODE_TOKEN}")],
                timeout=60,
            )
        assert all(r.accepted for r in reply.results)
        assert node.wait_indexed(60)
        galleries[node_id] = (f"127.0.0.1:{port}", [r.image_id for r in reply.results], items)
    try:
        yield galleries
    finally:
        for server, node in started:
            shutdown(server, node, 1.0)


def search(handle, k: int = 12) -> broker_pb2.BrokerSearchResponse:
    request = broker_pb2.BrokerSearchRequest(text=QUERY, k=k, deadline_ms=10_000)
    return handle.stub.Search(request, metadata=AUTH, timeout=30)


def test_a_verified_student_is_merged_by_score_with_the_teacher(
    tmp_path, tiny_model, start_broker, crops_dir
):
    from common.factory import create_model

    student_dir = agreeing_student(tiny_model, tmp_path / "student")
    student = create_model(student_dir)
    models = {"teacher": "tiny", "student": str(student_dir)}
    with serve_nodes(tmp_path, models) as nodes:
        config = broker_config(
            {node_id: addr for node_id, (addr, _, _) in nodes.items()},
            NODE_TOKEN,
            students=StudentSettings(calibration_crops=crops_dir, min_agreement=0.9),
        )
        handle = start_broker(config, encoder=tiny_model)
        before = search(handle)  # no health check yet: nothing verified, rank fusion
        assert before.merge == "rrf" and "mixed_model_versions" in before.coverage.degraded
        note = {o.node_id: o for o in before.coverage.nodes}["student"].student.note
        assert note.startswith("not verified yet") and note.endswith("merged by rank fusion")

        handle.broker.registry.check_all()  # Status, then the calibration probe
        response = search(handle)
        assert response.merge == "score" and not response.coverage.degraded
        outcomes = {o.node_id: o for o in response.coverage.nodes}
        assert not outcomes["teacher"].HasField("student")
        check = outcomes["student"].student
        assert outcomes["student"].model_version == student.version != tiny_model.version
        assert check.teacher_version == tiny_model.version and check.verified
        assert check.agreement == pytest.approx(1.0, abs=1e-4) and check.crops == 6
        assert check.note.startswith("verified: agreement")

        # the merged list is one score-sorted list over both galleries
        vector = tiny_model.encode_text([QUERY]).numpy()[0]
        keys, rows = [], []
        for node_id, model in (("teacher", tiny_model), ("student", student)):
            _addr, ids, items = nodes[node_id]
            keys += [(node_id, i) for i in ids]
            rows.append(model.encode_images([load_image(it.data) for it in items]).numpy())
        scores = np.concatenate(rows) @ vector
        order = np.argsort(-scores)[:12]
        assert [(h.node_id, h.image_id) for h in response.hits] == [keys[i] for i in order]
        np.testing.assert_allclose([h.score for h in response.hits], scores[order], atol=1e-5)
        assert {h.model_version for h in response.hits if h.node_id == "student"} == {
            student.version
        }  # each hit still names the model that scored it

        line = coverage_line(response)  # what `fedretrieve query` and the console show
        assert f"student answered with student {student.version} of teacher " in line
        view = coverage_view(response)
        assert view.verified_students == ["student"] and not view.rrf
        templates = Path(__file__).resolve().parents[2] / "server" / "console" / "templates"
        html = Environment(loader=FileSystemLoader(str(templates)), autoescape=True).get_template(
            "_coverage.html"
        )
        page = html.render(coverage=view, coverage_text=line)
        assert "the broker verified: student" in page and "verified: agreement" in page

        status = handle.stub.Status(broker_pb2.BrokerStatusRequest(), metadata=AUTH, timeout=10)
        fleet = {n.node_id: n for n in status.nodes}
        assert fleet["student"].query_version == tiny_model.version
        assert fleet["student"].student.verified
        assert fleet["teacher"].query_version == fleet["teacher"].model_version
        assert not fleet["teacher"].HasField("student")


def test_a_disagreeing_student_falls_back_to_rank_fusion_with_its_measured_agreement(
    tmp_path, tiny_model, start_broker, crops_dir
):
    from common.factory import create_model

    student_dir = random_student(tiny_model, tmp_path / "student")
    student = create_model(student_dir)
    images = [load_image(p.read_bytes()) for p in sorted(crops_dir.iterdir())]
    measured = mean_cosine(
        student.encode_images(images).numpy(), tiny_model.encode_images(images).numpy()
    )
    assert measured < 0.9
    with serve_nodes(tmp_path, {"teacher": "tiny", "student": str(student_dir)}) as nodes:
        addresses = {node_id: addr for node_id, (addr, _, _) in nodes.items()}
        for students, words in (
            (StudentSettings(calibration_crops=crops_dir), "not verified: agreement "),
            (StudentSettings(), "not verified: no [students] calibration-crops"),
        ):
            config = broker_config(addresses, NODE_TOKEN, students=students)
            handle = start_broker(config, encoder=tiny_model)
            handle.broker.registry.check_all()
            response = search(handle)
            assert response.merge == "rrf" and "mixed_model_versions" in response.coverage.degraded
            check = {o.node_id: o for o in response.coverage.nodes}["student"].student
            assert check.teacher_version == tiny_model.version and not check.verified
            assert check.note.startswith(words) and check.note.endswith("merged by rank fusion")
            if students.calibration_crops is not None:
                assert check.agreement == pytest.approx(measured, abs=1e-4)
                assert f"{check.agreement:.4f} < 0.9" in check.note and check.crops == 6
            else:
                assert check.agreement == 0.0 and check.crops == 0


def test_the_students_table_is_checked_at_load_naming_the_key(tmp_path, crops_dir):
    base = 'operator-tokens = ["t"]\n[[nodes]]\nid = "a"\naddress = "127.0.0.1:1"\n'

    def load(table: str):
        path = tmp_path / "broker.toml"
        path.write_text(base + "[students]\n" + table)
        return load_broker_config(path)

    config = load(f'calibration-crops = "{crops_dir.name}"\nmin-agreement = 0.95\n')
    assert config.students.calibration_crops == crops_dir  # relative to the config file
    assert config.students.min_agreement == 0.95
    plain = tmp_path / "plain.toml"
    plain.write_text(base)
    assert load_broker_config(plain).students == StudentSettings()  # no table: as before
    (tmp_path / "empty").mkdir()
    for table, words in (
        ("min-agreement = 1.5\n", "`min-agreement` must be a mean cosine in (0, 1], got 1.5"),
        ("min-agreement = 0\n", "`min-agreement`"),
        ('calibration-crops = "nowhere"\n', "`calibration-crops`"),
        ('calibration-crops = "empty"\n', "holds no"),
        ("probe-timeout-s = 0\n", "`probe-timeout-s`"),
        ("min-agrement = 0.9\n", "min-agrement"),
    ):
        with pytest.raises(ConfigError, match="students") as err:
            load(table)
        assert words in str(err.value), str(err.value)
