//! The policy route a gateway's UDP capture needs: packets the rules marked with
//! `gateway.udp_mark` (TPROXY, `nft.rs`) are looked up in `gateway.udp_route_table`, which holds
//! one route, `local` for every address, so they are delivered to this host's socket instead of
//! being forwarded. Through the `ip` program (iproute2), as `nft.rs` goes through `nft`.
//!
//! Like the nftables table, the rule and the route stay when the agent stops (the marked UDP
//! then meets no socket and is dropped, never forwarded) and go with `tapproof capture remove`.

use std::process::Command;

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} refused: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn families(ipv6: bool) -> Vec<(&'static str, &'static str)> {
    let mut f = vec![("-4", "0.0.0.0/0")];
    if ipv6 {
        f.push(("-6", "::/0"));
    }
    f
}

/// Installs the rule (once) and the route; idempotent.
pub fn ensure(mark: u32, table: u32, ipv6: bool) -> Result<(), String> {
    let (mark, table) = (mark.to_string(), table.to_string());
    for (family, everything) in families(ipv6) {
        let listed = ip(&[family, "rule", "show", "fwmark", &mark, "lookup", &table])?;
        if listed.trim().is_empty() {
            ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        ip(&[
            family, "route", "replace", "local", everything, "dev", "lo", "table", &table,
        ])?;
    }
    Ok(())
}

/// Removes every rule sending `mark` to `table` and the table's routes; whether there was any.
pub fn remove(mark: u32, table: u32, ipv6: bool) -> Result<bool, String> {
    let (mark, table) = (mark.to_string(), table.to_string());
    let mut any = false;
    for (family, _) in families(ipv6) {
        while ip(&[family, "rule", "del", "fwmark", &mark, "lookup", &table]).is_ok() {
            any = true;
        }
        if !ip(&[family, "route", "show", "table", &table])?.trim().is_empty() {
            ip(&[family, "route", "flush", "table", &table])?;
            any = true;
        }
    }
    Ok(any)
}
