"""Account-level settings of the simulated venue that a pre-flight check reads (no I/O).

Binance answers these from places other than the futures matching engine: the API key's
permissions (``GET /sapi/v1/account/apiRestrictions``, a wallet endpoint that the futures testnet
does not serve), Multi-Assets mode (``GET /fapi/v1/multiAssetsMargin``, ``accountConfig``) and
which websocket routes a host accepts (contract 1.1: unconfirmed for the testnet). The simulator
keeps them here so that tests and ``pyquant doctor`` runs can make a check fail on purpose: each
field can be set at start (``pyquant sim`` flags, ``serve(account=...)``) or at run time through
the loopback-only ``/admin/account`` hook.

Defaults describe a careful account: single-asset mode, a key that can read and trade futures,
cannot withdraw and is restricted to an IP list, every websocket route served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["WS_ROUTES", "AccountSettings"]

# Websocket routes of the venue: the legacy root (``/ws``, ``/stream``) and the 2026 split.
WS_ROUTES = ("root", "public", "market", "private")

_PERMISSION_FIELDS = {
    "ipRestrict": "ip_restrict",
    "enableReading": "enable_reading",
    "enableFutures": "enable_futures",
    "enableWithdrawals": "enable_withdrawals",
    "enableInternalTransfer": "enable_internal_transfer",
    "enableSpotAndMarginTrading": "enable_spot_and_margin_trading",
}


@dataclass
class AccountSettings:
    """What the venue reports about the account and the API key, and which routes it refuses."""

    multi_assets: bool = False
    ip_restrict: bool = True
    enable_reading: bool = True
    enable_futures: bool = True
    enable_withdrawals: bool = False
    enable_internal_transfer: bool = False
    enable_spot_and_margin_trading: bool = False
    # False: answer GET /sapi/v1/account/apiRestrictions with 404 as the futures testnet does
    api_restrictions_served: bool = True
    refused_ws_routes: set[str] = field(default_factory=set)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (wire names for permissions, field names otherwise).

        Raises:
            ValueError: an unknown name, a non-boolean flag or an unknown route; nothing is
                changed then.
        """
        staged: dict[str, Any] = {}
        for name, value in changes.items():
            attr = _PERMISSION_FIELDS.get(name, name)
            if attr == "refused_ws_routes":
                if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
                    raise ValueError(f"refused_ws_routes must be a list of route names: {value!r}")
                unknown = sorted(set(value) - set(WS_ROUTES))
                if unknown:
                    raise ValueError(
                        f"refused_ws_routes: unknown route(s) {unknown}; known: {list(WS_ROUTES)}"
                    )
                staged[attr] = set(value)
            elif name in _PERMISSION_FIELDS or attr in _BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, found {value!r}")
                staged[attr] = value
            else:
                known = sorted([*_PERMISSION_FIELDS, *_BOOL_FIELDS, "refused_ws_routes"])
                raise ValueError(f"unknown account setting {name!r}; known: {known}")
        for attr, value in staged.items():
            setattr(self, attr, value)

    def api_restrictions(self, create_time: int) -> dict[str, Any]:
        """Body of ``GET /sapi/v1/account/apiRestrictions`` (docs: Get API Key Permission)."""
        return {
            "ipRestrict": self.ip_restrict,
            "createTime": create_time,
            "enableReading": self.enable_reading,
            "enableWithdrawals": self.enable_withdrawals,
            "enableInternalTransfer": self.enable_internal_transfer,
            "enableMargin": False,
            "enableFutures": self.enable_futures,
            "permitsUniversalTransfer": False,
            "enableVanillaOptions": False,
            "enableFixApiTrade": False,
            "enableFixReadOnly": False,
            "enableSpotAndMarginTrading": self.enable_spot_and_margin_trading,
            "enablePortfolioMarginTrading": False,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as the admin hook reports them."""
        out: dict[str, Any] = {
            wire: getattr(self, attr) for wire, attr in _PERMISSION_FIELDS.items()
        }
        out.update({attr: getattr(self, attr) for attr in _BOOL_FIELDS})
        out["refused_ws_routes"] = sorted(self.refused_ws_routes)
        return out


_BOOL_FIELDS = ("multi_assets", "api_restrictions_served")
