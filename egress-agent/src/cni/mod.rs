//! The pod-start gate of the tc layer: a chained CNI plugin (this same binary, installed as
//! `egressfw` in the CNI bin directory) that puts the tc programs on a new pod's veth during the
//! runtime's ADD, before any container of the pod runs, with no node agent needed. The agent
//! then binds the interface to the pod's policy, or takes the gate off when the pod is not
//! enforced.

pub mod conflist;
pub mod gate;
pub mod install;
pub mod plugin;
pub mod state;
