"""Drop-in replacements for the optimizers of the seed article "Optimization for Deep Learning".

Same names, signatures, defaults and ``update(w, alpha, dw, dr, lambdaa=1.0)`` contract, so code
written for the article's ``Network``/``Layer`` classes runs unchanged::

    from optserver_client.compat import AdamOptimizer   # instead of the article's module

    optimizer = AdamOptimizer()                 # each layer gets copy.copy(optimizer)
    w = optimizer.update(w, alpha, dl_dw, dr_dw, lambdaa)

The step is computed by an optserver, from the article's equations with its code's defects fixed:
Adam's bias correction uses the step count (``1 - rho**t``), AdaGrad accumulates the same
``g = dw + lambdaa*dr`` it steps with, RMSProp with momentum keeps its state, and every class is
an :class:`Optimizer`. With ``alpha`` constant, results equal the article's equations.

How it maps: each optimizer object owns one remote session (optimizer-as-a-service style: created
on the first ``update``, tensors registered on first sight). Each ``update`` computes
``g = dw + lambdaa*dr`` locally and sends one step carrying ``w``, ``g`` and ``lr=alpha``. Inside
the session a tensor is named after its shape (``w_784x10``), so one object may serve tensors of
several shapes; tensors of the same shape share optimizer state, as in the article's code.
``copy.copy`` and ``copy.deepcopy`` give an optimizer with its own, new remote state.

Server: ``OPTSERVER_URLS`` (comma-separated shards: sessions are sharded over them) or
``OPTSERVER_URL`` (default ``http://127.0.0.1:8000``) and ``OPTSERVER_ADMIN_KEY``, read
when the process's shared :class:`~optserver_client.Client` is first needed; or
:func:`set_client`. Remote sessions are deleted by :meth:`Optimizer.close`; otherwise they are
left to the server's session expiry (nothing is deleted at garbage collection or exit).

``update`` returns the type of ``w``: a numpy array of ``w``'s dtype, a torch tensor of ``w``'s
dtype and device (torch is imported only when ``w`` is a tensor), a float for a float, a numpy
array for anything else. A NaN or Inf gradient raises
:class:`~optserver_client.ValidationError` (the server's default non-finite policy).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Self, TypeVar, overload

import numpy as np
import numpy.typing as npt

from optserver_client._client import Client, Session
from optserver_client._codec import FLOAT_DTYPES, TensorLike, as_array
from optserver_client.exceptions import NotFoundError

__all__ = [
    "AdaGradOptimizer",
    "AdamOptimizer",
    "DefaultRMSPropOptimizer",
    "DefaultSGDOptimizer",
    "Optimizer",
    "RMSPropMomentumOptimizer",
    "RMSPropOptimizer",
    "SGDMomentumOptimizer",
    "SGDOptimizer",
    "get_client",
    "set_client",
]

DEFAULT_URL = "http://127.0.0.1:8000"
#: The article's small constant delta, in AdaGrad, RMSProp and Adam.
DELTA = 1e-5

_S = TypeVar("_S", bound=np.generic)

_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")

_lock = threading.Lock()
_client: Client | None = None
_client_pid = 0  # a client is not carried across fork(): its connections belong to the parent
_client_is_ours = False


def get_client() -> Client:
    """The process's shared client, created from the environment on first use."""
    global _client, _client_pid, _client_is_ours
    with _lock:
        if _client is None or (_client_is_ours and _client_pid != os.getpid()):
            _client = Client(
                os.environ.get("OPTSERVER_URLS") or os.environ.get("OPTSERVER_URL", DEFAULT_URL),
                admin_key=os.environ.get("OPTSERVER_ADMIN_KEY") or None,
            )
            _client_pid, _client_is_ours = os.getpid(), True
            atexit.register(_client.close)
        return _client


def set_client(client: Client | None) -> None:
    """Use ``client`` for optimizers' sessions created from now on (None: back to the
    environment's server). The caller keeps ownership of ``client``."""
    global _client, _client_pid, _client_is_ours
    with _lock:
        _client, _client_pid, _client_is_ours = client, os.getpid(), False


class Optimizer(ABC):
    """Base class of the optimizers; ``update`` sends one step to the optimizer's session."""

    def __init__(self) -> None:
        self._session: Session | None = None

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The server's optimizer configuration equivalent to this optimizer."""

    @abstractmethod
    def __copy__(self) -> Self:
        """A new optimizer with the same hyperparameters and new (empty) remote state."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self.__copy__()

    @property
    def session(self) -> Session | None:
        """The remote session, once the first ``update`` has created it."""
        return self._session

    @overload
    def update(
        self,
        w: npt.NDArray[_S],
        alpha: float,
        dw: TensorLike,
        dr: TensorLike,
        lambdaa: float = 1.0,
    ) -> npt.NDArray[_S]: ...
    @overload
    def update(self, w: Any, alpha: float, dw: Any, dr: Any, lambdaa: float = 1.0) -> Any: ...

    def update(self, w: Any, alpha: float, dw: Any, dr: Any, lambdaa: float = 1.0) -> Any:
        """Update weights

        Args:
            w: weight tensor
            alpha: learning rate
            dw: weight gradient
            dr: regularization gradient
            lambdaa: regularization lambda parameter

        Returns:
            updated weight tensor, of the type, dtype (and device) of ``w``
        """
        weights = as_array(w, default=_F32)
        if weights.dtype not in (_F32, _F64):  # float16 weights are stepped in float32
            weights = weights.astype(_F32)
        dtype = weights.dtype
        dw_array = as_array(dw, dtype, default=dtype)
        dr_array = as_array(dr, dtype, default=dtype)
        grad = dw_array + float(lambdaa) * dr_array
        if grad.shape != weights.shape:
            try:  # e.g. the article's no-op regularizer returns a one-element dr
                grad = np.broadcast_to(grad, weights.shape)
            except ValueError:
                raise ValueError(
                    f"gradient of shape {grad.shape} does not fit weights of shape {weights.shape}"
                ) from None
        name = _tensor_name(weights.shape)
        session = self._remote(dtype)
        new = session.step({name: grad}, params={name: weights}, lr=float(alpha))[name]
        return _like(w, new)

    def close(self) -> None:
        """Delete the remote session (its optimizer state); a later ``update`` starts anew."""
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(NotFoundError):  # already expired
                session.delete()

    def _remote(self, dtype: np.dtype[Any]) -> Session:
        session = self._session
        if session is not None:
            return session
        created = get_client().create_session(
            None, self.config(), name=f"compat-{type(self).__name__}", dtype=dtype.name
        )
        with _lock:
            if self._session is None:
                self._session = created
                return created
            winner = self._session
        # Another thread's first update won the race (no lock is held over the network): ours goes.
        with contextlib.suppress(Exception):
            created.delete()
        return winner

    def __repr__(self) -> str:
        remote = f" session={self._session.id!r}" if self._session is not None else ""
        return f"<{type(self).__name__}{remote}>"


def SGDOptimizer(momentum: bool = False, epsilon: float = 1e-4) -> Optimizer:
    """Return stochastic gradient descent optimizer

    Args:
        momentum: whether to include momentum or not
        epsilon: epsilon parameter for momentum

    Returns:
        stochastic gradient descent optimizer
    """
    return SGDMomentumOptimizer(epsilon=epsilon) if momentum else DefaultSGDOptimizer()


class DefaultSGDOptimizer(Optimizer):
    """Stochastic gradient descent: ``w = w - alpha*g``."""

    def config(self) -> dict[str, Any]:
        return {"name": "sgd", "momentum": 0.0}

    def __copy__(self) -> Self:
        return type(self)()


class SGDMomentumOptimizer(Optimizer):
    """SGD with momentum: ``v = epsilon*v - alpha*g; w = w + v`` (torch's SGD with
    ``momentum=epsilon``, the same at constant alpha)."""

    def __init__(self, epsilon: float = 1e-4) -> None:
        super().__init__()
        self.epsilon = epsilon

    def config(self) -> dict[str, Any]:
        return {"name": "sgd", "momentum": self.epsilon}

    def __copy__(self) -> Self:
        return type(self)(epsilon=self.epsilon)


class AdaGradOptimizer(Optimizer):
    """AdaGrad: ``r = r + g**2; w = w - alpha*g/(delta + sqrt(r))``, delta = 1e-5."""

    def __init__(self) -> None:
        super().__init__()
        self.delta = DELTA

    def config(self) -> dict[str, Any]:
        return {"name": "adagrad", "eps": self.delta}

    def __copy__(self) -> Self:
        return type(self)()


def RMSPropOptimizer(momentum: bool = False, rho: float = 0.9, epsilon: float = 1e-4) -> Optimizer:
    """Return RMSProp optimizer

    Args:
        momentum: whether to include momentum or not
        epsilon: epsilon parameter for momentum
        rho: rho parameter for RMSProp

    Returns:
        RMSProp optimizer
    """
    if momentum:
        return RMSPropMomentumOptimizer(rho=rho, epsilon=epsilon)
    return DefaultRMSPropOptimizer(rho=rho)


class DefaultRMSPropOptimizer(Optimizer):
    """RMSProp: ``r = rho*r + (1-rho)*g**2; w = w - alpha*g/sqrt(delta + r)``, delta = 1e-5
    (the constant inside the square root, as in the article)."""

    def __init__(self, rho: float = 0.9) -> None:
        super().__init__()
        self.delta = DELTA
        self.rho = rho

    def config(self) -> dict[str, Any]:
        return {
            "name": "rmsprop",
            "alpha": self.rho,
            "eps": self.delta,
            "eps_inside_sqrt": True,
            "momentum": 0.0,
        }

    def __copy__(self) -> Self:
        return type(self)(rho=self.rho)


class RMSPropMomentumOptimizer(DefaultRMSPropOptimizer):
    """RMSProp with momentum: ``v = epsilon*v - alpha*g/sqrt(delta + r); w = w + v``."""

    def __init__(self, rho: float = 0.9, epsilon: float = 1e-4) -> None:
        super().__init__(rho)
        self.epsilon = epsilon

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.epsilon}

    def __copy__(self) -> Self:
        return type(self)(rho=self.rho, epsilon=self.epsilon)


class AdamOptimizer(Optimizer):
    """Adam with bias correction by the step count t:
    ``s_hat = s/(1 - rho1**t); r_hat = r/(1 - rho2**t); w = w - alpha*s_hat/(sqrt(r_hat) + delta)``.
    """

    def __init__(self, rho1: float = 0.9, rho2: float = 0.999) -> None:
        super().__init__()
        self.delta = DELTA
        self.rho1 = rho1
        self.rho2 = rho2

    def config(self) -> dict[str, Any]:
        return {"name": "adam", "betas": [self.rho1, self.rho2], "eps": self.delta}

    def __copy__(self) -> Self:
        return type(self)(rho1=self.rho1, rho2=self.rho2)


def _tensor_name(shape: tuple[int, ...]) -> str:
    return "w_" + ("x".join(str(n) for n in shape) if shape else "scalar")


def _like(w: Any, new: npt.NDArray[Any]) -> Any:
    """``new`` as the type of ``w``: same dtype, and for torch tensors the same device."""
    if type(w).__module__.startswith("torch"):
        import torch  # already imported: w is a tensor

        return torch.from_numpy(new).to(device=w.device, dtype=w.dtype)
    if isinstance(w, np.ndarray):
        return new.astype(w.dtype, copy=False)
    if isinstance(w, float | int) and not isinstance(w, bool):
        return float(new)
    if isinstance(w, np.generic) and w.dtype in FLOAT_DTYPES:
        return new.astype(w.dtype)[()]
    return new
