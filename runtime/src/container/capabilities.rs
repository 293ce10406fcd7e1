//! Capability names in a process object. A spec written for a newer kernel may name capabilities
//! this runtime (and so the guest kernel, which knows every one the spec library does) has
//! never heard of; like runc, those are left out with a warning instead of failing the
//! container.

use oci_spec::runtime::Capability;
use serde_json::Value;

/// The capability sets of an OCI process object.
const SETS: [&str; 5] = [
    "bounding",
    "effective",
    "inheritable",
    "permitted",
    "ambient",
];

/// Removes the names no [`Capability`] stands for from `process`'s capability sets; returns
/// them, sorted and once each. Entries that are not strings stay, for the spec's own parser
/// to reject.
pub fn drop_unknown(process: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let Some(sets) = process
        .get_mut("capabilities")
        .and_then(Value::as_object_mut)
    else {
        return unknown;
    };
    for set in SETS {
        let Some(list) = sets.get_mut(set).and_then(Value::as_array_mut) else {
            continue;
        };
        list.retain(|name| {
            let Some(text) = name.as_str() else {
                return true;
            };
            let known = serde_json::from_value::<Capability>(name.clone()).is_ok();
            if !known {
                unknown.push(text.to_string());
            }
            known
        });
    }
    unknown.sort();
    unknown.dedup();
    unknown
}

/// runc's warning for the names [`drop_unknown`] removed.
pub fn warning(unknown: &[String]) -> String {
    format!(
        "ignoring unknown or unavailable capabilities: [{}]",
        unknown.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_names_leave_every_set_and_are_named_once() {
        let mut p = json!({"capabilities": {
            "bounding": ["CAP_KILL", "CAP_NEWER", "CAP_CHOWN"],
            "effective": ["CAP_NEWER", "CAP_ALSO_NEW"],
            "ambient": [],
        }});
        let unknown = drop_unknown(&mut p);
        assert_eq!(unknown, ["CAP_ALSO_NEW", "CAP_NEWER"]);
        assert_eq!(
            p["capabilities"]["bounding"],
            json!(["CAP_KILL", "CAP_CHOWN"])
        );
        assert_eq!(p["capabilities"]["effective"], json!([]));
        assert_eq!(
            warning(&unknown),
            "ignoring unknown or unavailable capabilities: [CAP_ALSO_NEW CAP_NEWER]"
        );
    }

    #[test]
    fn a_process_without_capabilities_is_left_as_it_is() {
        let mut p = json!({"args": ["sh"], "capabilities": {"bounding": [7]}});
        let before = p.clone();
        assert!(drop_unknown(&mut p).is_empty());
        assert_eq!(p, before);
        let mut none = json!({"args": ["sh"]});
        assert!(drop_unknown(&mut none).is_empty());
        assert_eq!(none, json!({"args": ["sh"]}));
    }
}
