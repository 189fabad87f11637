//! proto
use pullbox_puller::{error::Result, host::Host, types::{ImageInfo, PullRequest}, Puller};
pub struct AllowlistPuller;
impl Puller for AllowlistPuller {
    fn configure(_s: &str) -> Result<()> { Ok(()) }
    fn pull_image(host: &dyn Host, request: &PullRequest) -> Result<ImageInfo> {
        pullbox_puller::pull::pull(host, &pullbox_puller::settings::Settings::DEFAULT, request)
    }
}
#[cfg(target_arch = "wasm32")]
pullbox_puller::export_puller!(AllowlistPuller);
