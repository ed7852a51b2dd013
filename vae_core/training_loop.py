"""What runs in a Trainer's own thread: preparing, the training loop, evaluation, publishing.

`TrainingLoop` is the thread's half of `Trainer` (trainer.py holds the half any thread may
call). Its methods use the state Trainer.__init__ sets up and publish to readers only
under `self._lock`: metric rows, a status, images and a CPU copy of the weights.
"""
from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from . import runs
from .config import ConfigError
from .devices import describe_device
from .images import to_uint8
from .inference import N_FIXED, N_SAMPLES, held_out
from .models import build_model
from .objectives import elbo_loss, elbo_terms

EVIDENCE_BATCH = 64  # held-out images for the importance-weighted evaluation
EVIDENCE_KS = (1, 10, 100, 1000)
EVIDENCE_GRID_EXAMPLES = 8  # examples whose true log p(x) is integrated on a grid (2 latents)
STATES = ("idle", "running", "paused", "finished", "stopped", "failed")


class TrainingLoop:
    """The training thread's side of Trainer (mixed into it); see trainer.py for the attributes."""

    # ------------------------------------------------------------ the thread

    def _beta_effective_locked(self) -> float:
        w = self._live["warmup_epochs"]
        return self._live["beta"] * (min(1.0, self._epoch / w) if w > 0 else 1.0)

    def _set(self, state: str | None = None, message: str | None = None) -> None:
        with self._lock:
            if state is not None:
                self._state = state
            if message is not None:
                self._message = message
        self._write_status()

    def _write_status(self) -> None:
        """status.json from the in-memory state; the training thread and the heartbeat thread both call it."""
        if not (self.persist and self.run_dir is not None):
            return
        with self._status_write:
            s = self.status()
            fields = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("state", "message", "run_dir")}
            runs.write_status(self.run_dir, s.state, s.message, **fields, epochs_done=int(self._epoch),
                              steps_per_epoch=self._steps_per_epoch, control_seq=self._control_seq)

    def _run(self) -> None:
        try:
            self._run_guarded()
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
            with self._lock:
                self._wake.notify_all()
            for fn in self._on_exit:
                fn(self)

    def _run_guarded(self) -> None:
        try:
            torch.set_num_threads(self.num_threads)
            self._train()
        except (ConfigError, data_mod.DatasetUnavailable, runs.RunFileError) as e:  # expected, already worded
            if getattr(self, "model", None) is None and self._resume_ckpt is None and self.init_from is None:
                self._discard_unstarted_dir()  # e.g. a batch larger than the data: nothing was trained, keep nothing
            self._set("failed", str(e))
        except torch.OutOfMemoryError:
            self._set("failed", f"out of memory on {self.device.type} at batch size {self.config.train.batch_size}; "
                                "start again with a smaller batch size")
        except Exception as e:  # anything else in the thread becomes a failed status, never a hang
            traceback.print_exc()
            self._set("failed", f"{type(e).__name__}: {e}")

    def _discard_unstarted_dir(self) -> None:
        if self.persist and self.run_dir is not None and not (self.run_dir / runs.CHECKPOINT).exists():
            for f in self.run_dir.iterdir():
                if f.is_file():
                    f.unlink()
            self.run_dir.rmdir()
            self.persist = False  # nothing more is written for this run

    def _prepare(self) -> None:
        """Load data, build model and optimiser, create or reopen the run directory."""
        self.create_run_dir()
        if getattr(self, "model", None) is not None:
            # This trainer ran before (stopped, failed or finished, then started again): its model,
            # optimiser and generator in memory are exactly what it last checkpointed.
            if self.persist and self.run_dir is not None:
                runs.truncate_metrics(self.run_dir, self._step)
                self.writer = runs.MetricsWriter(self.run_dir)
            return
        cfg = self.config
        self._set(message=f"loading {cfg.train.dataset}")
        data = self.check()
        n_train = len(data.train_x)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        self.train_x = data.train_x.to(self.device)
        self.test_x = data.test_x.to(self.device)
        self.test_y = data.test_y
        # The test set is binarized once, by the one held-out rule (a CPU generator, so the same images on any device).
        self.test_xb = held_out(data, cfg, len(data.test_x)).to(self.device)
        self.batcher = data_mod.IndexBatcher(n_train, cfg.train.batch_size, self.gen, self.device)
        with self._lock:
            self._steps_per_epoch = self.batcher.steps_per_epoch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.model = build_model(cfg.model).to(self.device)
        self.opt = self._make_optimizer()
        ckpt = self._resume_ckpt
        if ckpt is None and self.init_from is not None:
            ckpt = runs.load_checkpoint(self.init_from / runs.CHECKPOINT)
            self.parent = {"run": self.init_from.name, "step": int(ckpt["step"])}
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            if "optimizer" in ckpt:
                self.opt.load_state_dict(ckpt["optimizer"])
            if "generator" in ckpt and self.device.type == "cpu":
                self.gen.set_state(ckpt["generator"])
            for g in self.opt.param_groups:
                g["lr"] = self._live["lr"]
            if self.parent is not None:  # a fork starts its own step count at the parent's
                with self._lock:
                    self._step, self._epoch = int(ckpt["step"]), float(ckpt.get("epoch", 0))
                    self._epochs_target = math.ceil(self._epoch) + cfg.train.epochs

        if self.persist:  # start() created the directory; record what only loading the data told us
            runs.truncate_metrics(self.run_dir, self._step)  # resuming: drop rows written after the checkpoint
            previous = runs.read_json(self.run_dir / runs.CONFIG)
            kept = {k: v for k, v in previous.items() if k not in ("model", "train", "versions")}  # owner, sweep, ...
            runs.write_config(self.run_dir, cfg, **{**kept, "created": previous.get("created", time.time()),
                                                     "parent": self.parent or previous.get("parent"),
                                                     "device": describe_device(self.device),
                                                     "dataset_source": data.source})
            self.writer = runs.MetricsWriter(self.run_dir)
        fixed = torch.Generator().manual_seed(0)
        self.fixed_idx = torch.arange(N_FIXED)
        self.fixed_z = torch.randn((N_SAMPLES, cfg.model.latent_dim), generator=fixed).to(self.device)
        self._last_good = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._publish_weights(self._last_good)
        self._render_artifacts()

    def _train(self) -> None:
        self._prepare()
        cfg = self.config
        spe = self.batcher.steps_per_epoch
        self._set(message=f"training on {describe_device(self.device)}")
        acc = torch.zeros(4, device=self.device)  # loss, recon, kl, n — summed between log points
        last_publish = time.monotonic()
        torch.set_num_threads(self.num_threads)
        while True:
            epoch_idx = self._step // spe
            if epoch_idx >= self._epochs_target:
                break
            order = self.batcher.epoch()[self._step % spe:]  # a resumed run finishes its epoch
            t_epoch, n_seen = time.perf_counter(), 0
            for idx in order:
                if not self._wait_turn():
                    return self._finish("stopped", f"stopped at step {self._step}")
                x = self.train_x[idx]
                if cfg.binarized:
                    x = torch.bernoulli(x, generator=self.gen)  # dynamic binarization: a fresh draw per batch
                with self.cpu.step():  # the CPU-sharing policy: thread count and timing
                    acc += self.train_step(x)
                n_seen += len(idx)
                with self._lock:
                    self._step += 1
                    self._epoch = self._step / spe
                if self._step % self.log_every == 0 or self._step % spe == 0:
                    if not self._log_train(acc):
                        return
                    acc.zero_()
                    dt = time.perf_counter() - t_epoch
                    with self._lock:
                        self._samples_per_s = n_seen / dt if dt > 0 else 0.0
                    if time.monotonic() - last_publish > 1.0:
                        self._publish_model()
                        last_publish = time.monotonic()
            train_time = time.perf_counter() - t_epoch
            self._end_epoch(n_seen / train_time if train_time > 0 else 0.0)
        self._finish("finished", f"finished {self._epochs_target} epochs ({self._step} steps)")

    def _wait_turn(self) -> bool:
        """Block while paused (letting single steps through); False when asked to stop."""
        with self._lock:
            while True:
                if self._stop.is_set():
                    return False
                if self._state == "running":
                    return True
                if self._pending_steps > 0:
                    self._pending_steps -= 1
                    return True
                self._wake.wait(0.25)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # The fused kernel updates all parameters in one call: ~10% faster steps for this small MLP on CPU.
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.model.parameters(), lr=self._live["lr"], fused=fused)

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One Adam step on batch x; returns detached (loss, recon, kl, 1) for logging, no sync."""
        with self._lock:
            beta, free_bits, lr = self._beta_effective_locked(), self._live["free_bits"], self._live["lr"]
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        terms = elbo_terms(self.model, x, self.gen)
        loss = elbo_loss(terms, beta=beta, free_bits=free_bits)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return torch.stack([loss.detach(), terms.recon.detach().mean(), terms.kl.detach().mean(),
                            torch.ones((), device=x.device)])

    def _log_train(self, acc: torch.Tensor) -> bool:
        loss, recon, kl, n = acc.tolist()  # the one sync point per log interval
        if n == 0:
            return True
        loss, recon, kl = loss / n, recon / n, kl / n
        if not all(math.isfinite(v) for v in (loss, recon, kl)):
            self.model.load_state_dict(self._last_good)
            # Adam's moments may hold NaN too; a fresh optimiser is the safe restart.
            self.opt = self._make_optimizer()
            self._finish("failed", f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {self._step} "
                                   f"(beta={self._live['beta']:g}, lr={self._live['lr']:g}); the last good weights "
                                   f"were kept. Lower the learning rate, then resume.")
            return False
        with self._lock:
            beta_eff = self._beta_effective_locked()
        self._last_good = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._emit({"step": self._step, "epoch": round(self._epoch, 4), "split": "train", "elbo": recon - kl,
                    "recon": recon, "kl": kl, "loss": loss, "beta": beta_eff, "beta_set": self._live["beta"],
                    "lr": self._live["lr"], "free_bits": self._live["free_bits"], "wall_time": time.time()})
        return True

    def _emit(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(row)
        if self.persist and self.run_dir is not None:
            self.writer.write(row)
        for fn in self._listeners:
            fn(row)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, batch: int = 1000) -> dict[str, Any]:
        """Test-set ELBO, recon, KL (nats per example), per-dimension KL and active units; no weight change."""
        x = self.test_xb if x is None else x
        self.model.eval()
        sums = torch.zeros(3, device=self.device)
        kl_dims, mus = [], []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            t = elbo_terms(self.model, xb, self.gen)
            sums += torch.stack([t.recon.sum(), t.kl.sum(), torch.tensor(float(len(xb)), device=self.device)])
            kl_dims.append(t.kl_dims.sum(0))
            mus.append(t.mu)
        recon, kl, n = sums.tolist()
        mu = torch.cat(mus)
        per_dim = (torch.stack(kl_dims).sum(0) / n).cpu().numpy()
        variances = mu.var(0).cpu().numpy() if len(mu) > 1 else np.zeros(mu.shape[1])
        return {"elbo": (recon - kl) / n, "recon": recon / n, "kl": kl / n, "kl_per_dim": per_dim.tolist(),
                "active_units": int((variances > 0.01).sum()), "mu_variance": variances.tolist()}

    @torch.no_grad()
    def evidence(self, ks: tuple[int, ...] = EVIDENCE_KS) -> dict[str, Any]:
        """ELBO and importance-weighted bounds log p_k(x) on a fixed held-out batch, nats per example.

        The bounds rise with k toward log p(x) (Burda et al. 2016); their distance above the
        ELBO estimates KL(q(z|x) || p(z|x)), the inference gap. With 2 latents the true
        log p(x) by quadrature on a grid is added for a few of the examples.
        """
        from .evidence import grid_evidence, iwae_curve

        self.model.eval()
        x = self.test_xb[:EVIDENCE_BATCH]
        gen = torch.Generator(device=self.device).manual_seed(20_000 + self._step)
        out = iwae_curve(self.model, x, ks, generator=gen)
        if self.config.model.latent_dim == 2:
            out.update(grid_evidence(self.model, x[:EVIDENCE_GRID_EXAMPLES], n=64))
            # The same examples' IWAE bound, so the panel compares like with like.
            sub = iwae_curve(self.model, x[:EVIDENCE_GRID_EXAMPLES], (max(ks),), generator=gen)
            out["iwae_grid_examples"] = sub["iwae"][0]
        return out

    def _end_epoch(self, samples_per_s: float) -> None:
        ev = self.evaluate()
        self._publish_model()
        row = {"step": self._step, "epoch": int(round(self._epoch)), "split": "test", **ev,
               "beta": self.status().beta_effective, "samples_per_s": samples_per_s, "wall_time": time.time()}
        self._emit(row)
        if not math.isfinite(ev["elbo"]):
            self._finish("failed", f"the test ELBO became non-finite after epoch {int(self._epoch)}; lower the learning rate")
            return
        every = self.config.train.evidence_every
        epoch = int(round(self._epoch))
        if every and (epoch % every == 0 or epoch == self._epochs_target or epoch == 1):
            self._set(message=f"epoch {epoch}: estimating log p(x) with importance sampling")
            # k = 1000 costs ~0.5 s for the MLP but ~8 s for the conv net on 2 CPU cores; the panel's
            # on-demand evaluation goes higher when asked.
            ks = EVIDENCE_KS if self.config.model.arch == "mlp" or self.device.type != "cpu" else EVIDENCE_KS[:3]
            self._emit({"step": self._step, "epoch": epoch, "split": "evidence", **self.evidence(ks),
                        "wall_time": time.time()})
        self._checkpoint()
        self._set(message=f"epoch {epoch} of {self._epochs_target}: test ELBO {ev['elbo']:.2f} nats")

    def _checkpoint(self) -> None:
        if not self.persist or self.run_dir is None:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "config": self.config.to_dict(),
                 "step": self._step, "epoch": self._epoch, "live": dict(self._live)}
        if self.device.type == "cpu":
            state["generator"] = self.gen.get_state()
        runs.save_checkpoint(self.run_dir, state)

    def _finish(self, state: str, message: str) -> None:
        self._checkpoint()  # on failure the model already holds the last good weights again
        self._publish_model()
        if self.persist and self.run_dir is not None:
            self.writer.close()
        self._set(state, message)

    # ------------------------------------------------------------ publishing

    def _publish_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.weights.publish(state, self._step)

    def _publish_model(self) -> None:
        self._publish_weights(self._last_good)
        self._render_artifacts()

    @torch.no_grad()
    def _render_artifacts(self) -> None:
        self.model.eval()
        x = self.test_x[self.fixed_idx]
        mu, _ = self.model.encode(x)
        recon = self.model.decode(mu)
        samples = self.model.decode(self.fixed_z)
        art = {"originals": to_uint8(x[:, 0].cpu().numpy()), "reconstructions": to_uint8(recon[:, 0].cpu().numpy()),
               "samples": to_uint8(samples[:, 0].cpu().numpy()), "step": self._step}
        with self._lock:
            self._artifacts = art
