"""Launch helpers: pure commands, config writers, a 2-process CPU data-parallel run, DeepSpeed on CPU."""

import json
import sys
import textwrap

import pytest
import torch
import yaml

from diffalign.core.config import Config
from diffalign.core.launch import (
    LaunchConfig,
    accelerate_config_dict,
    build_command,
    deepspeed_config,
    is_main_process,
    launch,
    make_accelerator,
    resolve_deepspeed_config,
    write_accelerate_config,
    write_deepspeed_config,
)

PY = "/usr/bin/python3"


def _after(cmd, flag):
    return cmd[cmd.index(flag) + 1]


# --------------------------------------------------------------------------- LaunchConfig


def test_launch_config_is_a_strict_config():
    assert issubclass(LaunchConfig, Config)
    with pytest.raises(ValueError, match="bogus"):
        LaunchConfig(bogus=1)
    with pytest.raises(ValueError, match="deepspeed must be"):
        LaunchConfig(deepspeed="zero4")
    with pytest.raises(ValueError, match="DeepSpeed config file not found"):
        LaunchConfig(deepspeed="/nonexistent/ds.json")
    with pytest.raises(ValueError, match="main_process_ip"):
        LaunchConfig(launcher="torchrun", num_machines=2, num_processes=4)
    with pytest.raises(ValueError, match="multiple of num_machines"):
        LaunchConfig(launcher="torchrun", num_machines=2, num_processes=3, main_process_ip="10.0.0.1")
    with pytest.raises(ValueError, match="machine_rank"):
        LaunchConfig(
            launcher="accelerate", num_machines=2, num_processes=2, machine_rank=2, main_process_ip="h"
        )
    with pytest.raises(ValueError, match="launcher 'none' runs one process"):
        LaunchConfig(num_processes=2)


# --------------------------------------------------------------------------- build_command


def test_build_command_plain_python():
    assert build_command("diffalign.mlcm.train", ["--config", "r.yaml"], LaunchConfig(), python=PY) == [
        PY,
        "-m",
        "diffalign.mlcm.train",
        "--config",
        "r.yaml",
    ]


def test_build_command_torchrun_single_and_multi_node():
    cmd = build_command("m.train", ["a"], LaunchConfig(launcher="torchrun", num_processes=4), python=PY)
    assert cmd[:3] == [PY, "-m", "torch.distributed.run"]
    assert _after(cmd, "--nproc_per_node") == "4" and "--standalone" in cmd
    assert cmd[-3:] == ["-m", "m.train", "a"]

    cfg = LaunchConfig(
        launcher="torchrun",
        num_processes=8,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29555,
    )
    cmd = build_command("m.train", [], cfg, python=PY)
    assert _after(cmd, "--nproc_per_node") == "4"  # per node
    assert _after(cmd, "--nnodes") == "2" and _after(cmd, "--node_rank") == "1"
    assert _after(cmd, "--master_addr") == "10.0.0.1" and _after(cmd, "--master_port") == "29555"
    assert "--standalone" not in cmd


def test_build_command_accelerate_ddp_and_deepspeed_presets():
    cmd = build_command("m.train", ["x"], LaunchConfig(launcher="accelerate", num_processes=2), python=PY)
    assert cmd[:3] == [PY, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and _after(cmd, "--num_processes") == "2" and "--use_deepspeed" not in cmd
    assert cmd[-3:] == ["-m", "m.train", "x"]

    cfg = LaunchConfig(
        launcher="accelerate",
        num_processes=2,
        deepspeed="zero3_offload",
        mixed_precision="bf16",
        gradient_accumulation_steps=4,
        gradient_clipping=1.0,
    )
    cmd = build_command("m.train", [], cfg, python=PY)
    assert "--use_deepspeed" in cmd and "--multi_gpu" not in cmd
    assert _after(cmd, "--zero_stage") == "3" and _after(cmd, "--zero3_init_flag") == "true"
    assert (
        _after(cmd, "--offload_optimizer_device") == "cpu" and _after(cmd, "--offload_param_device") == "cpu"
    )
    assert _after(cmd, "--gradient_accumulation_steps") == "4" and _after(cmd, "--gradient_clipping") == "1.0"
    assert _after(cmd, "--mixed_precision") == "bf16"

    cmd = build_command("m", [], LaunchConfig(launcher="accelerate", deepspeed="zero2"), python=PY)
    assert _after(cmd, "--zero_stage") == "2" and _after(cmd, "--offload_param_device") == "none"


def test_build_command_accelerate_json_multinode_and_config_file(tmp_path):
    ds = write_deepspeed_config(tmp_path / "ds.json", LaunchConfig(deepspeed="zero2"))
    cfg = LaunchConfig(
        launcher="accelerate",
        num_processes=16,
        num_machines=2,
        machine_rank=0,
        main_process_ip="node0",
        main_process_port=1234,
        deepspeed=str(ds),
    )
    cmd = build_command("m", [], cfg, python=PY)
    assert _after(cmd, "--deepspeed_config_file") == str(ds) and "--zero_stage" not in cmd
    assert _after(cmd, "--num_machines") == "2" and _after(cmd, "--machine_rank") == "0"
    assert _after(cmd, "--main_process_ip") == "node0" and _after(cmd, "--main_process_port") == "1234"

    acc_file = write_accelerate_config(tmp_path / "acc.yaml", LaunchConfig(launcher="accelerate"))
    cmd = build_command(
        "m", ["y"], LaunchConfig(launcher="accelerate", accelerate_config_file=str(acc_file)), python=PY
    )
    assert cmd == [PY, "-m", "accelerate.commands.launch", "--config_file", str(acc_file), "-m", "m", "y"]


def test_build_command_rejects_bad_module():
    with pytest.raises(ValueError, match="module"):
        build_command("--evil", [], LaunchConfig())


# --------------------------------------------------------------------------- config writers


def test_accelerate_config_is_read_back_by_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = LaunchConfig(
        launcher="accelerate",
        num_processes=4,
        deepspeed="zero3_offload",
        mixed_precision="bf16",
        gradient_clipping=0.5,
    )
    path = write_accelerate_config(tmp_path / "acc.yaml", cfg)
    loaded = load_config_from_file(str(path))
    assert str(loaded.distributed_type).endswith("DEEPSPEED") and loaded.num_processes == 4
    assert loaded.deepspeed_config["zero_stage"] == 3
    assert loaded.deepspeed_config["offload_param_device"] == "cpu"
    assert loaded.deepspeed_config["gradient_clipping"] == 0.5
    ddp = accelerate_config_dict(LaunchConfig(launcher="accelerate", num_processes=2))
    assert ddp["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in ddp
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"


def test_deepspeed_configs_validated_by_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    for stage, offload in [(2, False), (3, False), (2, True), (3, True)]:
        raw = deepspeed_config(stage, offload)
        assert raw["train_micro_batch_size_per_gpu"] == "auto"
        resolved = resolve_deepspeed_config(
            raw, micro_batch_size=2, world_size=1, gradient_accumulation_steps=3
        )
        parsed = DeepSpeedConfig(resolved)
        assert parsed.zero_optimization_stage == stage
        assert parsed.train_batch_size == 6 and parsed.gradient_accumulation_steps == 3
        assert (parsed.zero_config.offload_optimizer is not None) == offload
        assert (parsed.zero_config.offload_param is not None) == (offload and stage == 3)
    # negative control: DeepSpeed itself rejects an inconsistent batch layout
    bad = resolve_deepspeed_config(deepspeed_config(2), micro_batch_size=2)
    bad["train_batch_size"] = 5
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(bad)
    with pytest.raises(ValueError, match="auto"):
        resolve_deepspeed_config({"zero_optimization": {"reduce_bucket_size": "auto"}}, micro_batch_size=1)
    with pytest.raises(ValueError, match="stage"):
        deepspeed_config(1)


def test_json_deepspeed_path_round_trip(tmp_path):
    path = write_deepspeed_config(tmp_path / "ds.json", LaunchConfig(deepspeed="zero3"))
    cfg = LaunchConfig(launcher="accelerate", deepspeed=str(path))
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 3
    assert accelerate_config_dict(cfg)["deepspeed_config"]["zero3_init_flag"] is True


# --------------------------------------------------------------------------- single process accelerator


def test_make_accelerator_single_process(tmp_path):
    from accelerate.state import AcceleratorState, PartialState

    try:
        acc = make_accelerator(LaunchConfig(gradient_accumulation_steps=2), run_dir=tmp_path, log_with="auto")
        assert acc.num_processes == 1 and acc.is_main_process and is_main_process()
        assert acc.gradient_accumulation_steps == 2
        assert str(acc.project_dir) == str(tmp_path)
        assert [
            type(t).__name__ for t in acc.trackers
        ] == [] or acc.log_with  # trackers start on init_trackers
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    try:
        assert make_accelerator(LaunchConfig()).log_with == []
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


# --------------------------------------------------------------------------- 2-process data parallel


def _dp_worker():
    """Runs in each of 2 processes: DDP gradient on a half batch == full-batch gradient."""
    import torch

    from diffalign.core.launch import LaunchConfig, make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator(LaunchConfig(launcher="accelerate", num_processes=2))
    assert acc.num_processes == 2, acc.state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))

    torch.nn.functional.mse_loss(reference(x), y).backward()
    full = [p.grad.clone() for p in reference.parameters()]

    ddp = acc.prepare(model)
    shard = slice(acc.process_index * 4, (acc.process_index + 1) * 4)
    acc.backward(torch.nn.functional.mse_loss(ddp(x[shard]), y[shard]))
    averaged = [p.grad for p in model.parameters()]
    for a, b in zip(averaged, full):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # negative control: the local (un-reduced) half-batch gradient is not the full-batch gradient
    local = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    local.load_state_dict(reference.state_dict())
    torch.nn.functional.mse_loss(local(x[shard]), y[shard]).backward()
    assert not all(torch.allclose(p.grad, b, atol=1e-4) for p, b in zip(local.parameters(), full))


def test_two_process_cpu_data_parallel_matches_full_batch():
    from accelerate import debug_launcher

    debug_launcher(_dp_worker, num_processes=2)


# --------------------------------------------------------------------------- DeepSpeed ZeRO step on CPU

_ZERO_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import deepspeed
    import deepspeed.comm.torch
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]  # the attribute path would find torch itself
    from diffalign.core.launch import deepspeed_config, resolve_deepspeed_config

    # The CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes on 2 cores);
    # with one process it is not needed, so skip building it.
    ds_comm_torch.build_shm_op = lambda: None
    torch.set_num_threads(1)
    out = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        reference.load_state_dict(model.state_dict())
        unclipped = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        unclipped.load_state_dict(model.state_dict())
        x = 3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
        y = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
        cfg = resolve_deepspeed_config(deepspeed_config(stage), micro_batch_size=4, gradient_clipping=0.1)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=cfg
        )
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        for net, clip in ((reference, True), (unclipped, False)):
            opt = torch.optim.SGD(net.parameters(), lr=0.5)
            torch.nn.functional.mse_loss(net(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            opt.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            got = [p.detach().clone() for p in model.parameters()]
        out[stage] = {
            "err": max((a - b.detach()).abs().max().item() for a, b in zip(got, reference.parameters())),
            "err_unclipped": max((a - b.detach()).abs().max().item() for a, b in zip(got, unclipped.parameters())),
            "optimizer": type(engine.optimizer).__name__,
        }
    json.dump(out, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow  # about 25 s on 2 shared cores (deepspeed import + two engines)
@pytest.mark.timeout(300)
def test_zero_step_on_cpu_via_torchrun(tmp_path):
    pytest.importorskip("deepspeed")
    (tmp_path / "zero_worker_mod.py").write_text(_ZERO_WORKER)
    result = tmp_path / "out.json"
    code = launch(
        "zero_worker_mod",
        [str(result)],
        LaunchConfig(launcher="torchrun", num_processes=1),
        env={
            "PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        },
        cwd=tmp_path,
    )
    assert code == 0
    out = json.loads(result.read_text())
    for stage in ("2", "3"):
        assert out[stage]["err"] < 1e-6, out
        # negative control: the same step without DeepSpeed's clipping is measurably different
        assert out[stage]["err_unclipped"] > 1e-3, out
    assert out["2"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert out["3"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"


def test_launch_raises_with_command_on_failure(tmp_path):
    import subprocess

    (tmp_path / "failing_mod.py").write_text("import sys; sys.exit(3)\n")
    with pytest.raises(subprocess.CalledProcessError) as info:
        launch("failing_mod", [], LaunchConfig(), env={"PYTHONPATH": str(tmp_path)})
    assert info.value.returncode == 3 and "failing_mod" in info.value.cmd
    assert launch("failing_mod", [], LaunchConfig(), env={"PYTHONPATH": str(tmp_path)}, check=False) == 3


def test_is_main_process_reads_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    assert torch.distributed.is_available()


def test_built_commands_parse_with_the_launchers_own_parsers(tmp_path):
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    ds = write_deepspeed_config(tmp_path / "ds.json", LaunchConfig(deepspeed="zero3"))
    accelerate_cfgs = [
        LaunchConfig(launcher="accelerate", num_processes=2),
        LaunchConfig(
            launcher="accelerate", num_processes=4, deepspeed="zero3_offload", gradient_clipping=1.0
        ),
        LaunchConfig(
            launcher="accelerate", num_processes=4, num_machines=2, main_process_ip="h", deepspeed=str(ds)
        ),
    ]
    for cfg in accelerate_cfgs:
        cmd = build_command("pkg.train", ["--config", "r.yaml"], cfg, python=PY)
        args = launch_command_parser().parse_args(cmd[3:])
        assert args.module and args.training_script == "pkg.train"
        assert args.training_script_args == ["--config", "r.yaml"]
        assert args.num_processes == cfg.num_processes and args.use_deepspeed == cfg.uses_deepspeed
    torchrun_cfgs = [
        LaunchConfig(launcher="torchrun", num_processes=2),
        LaunchConfig(
            launcher="torchrun", num_processes=4, num_machines=2, machine_rank=1, main_process_ip="h"
        ),
    ]
    for cfg in torchrun_cfgs:
        cmd = build_command("pkg.train", ["--config", "r.yaml"], cfg, python=PY)
        args = get_args_parser().parse_args(cmd[3:])
        assert args.module and args.training_script == "pkg.train"
        assert args.training_script_args == ["--config", "r.yaml"]
        assert str(args.nproc_per_node) == str(cfg.processes_per_machine)


_ACCELERATE_DS_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import deepspeed.comm.torch
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]  # the attribute path would find torch itself
    from diffalign.core.launch import LaunchConfig, make_accelerator

    ds_comm_torch.build_shm_op = lambda: None  # see the ZeRO test: skip the CPU shm op build
    torch.set_num_threads(1)
    acc = make_accelerator(LaunchConfig(launcher="accelerate", deepspeed="zero2", gradient_clipping=0.1))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    x = 3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model, opt, loader = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5), loader)
    for bx, by in loader:
        acc.backward(torch.nn.functional.mse_loss(model(bx), by))
        opt.step()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    ref_opt.step()
    got = [p.detach() for p in acc.unwrap_model(model).parameters()]
    err = max((a - b.detach()).abs().max().item() for a, b in zip(got, reference.parameters()))
    json.dump({"type": str(acc.distributed_type), "err": err}, open(sys.argv[1], "w"))
    """
)


@pytest.mark.slow  # accelerate + DeepSpeed start-up in a subprocess: about 30 s on 2 shared cores
@pytest.mark.timeout(600)
def test_accelerate_launch_with_zero2_preset_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    (tmp_path / "acc_ds_worker.py").write_text(_ACCELERATE_DS_WORKER)
    result = tmp_path / "out.json"
    launch(
        "acc_ds_worker",
        [str(result)],
        LaunchConfig(launcher="accelerate", deepspeed="zero2", gradient_clipping=0.1),
        env={
            "PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
        },
        cwd=tmp_path,
    )
    out = json.loads(result.read_text())
    assert out["type"].endswith("DEEPSPEED") and out["err"] < 1e-6, out
