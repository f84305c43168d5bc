//! The log store of tables on S3. delta-rs picks a table's log store by its URL's scheme and,
//! built without its AWS crate (which brings the AWS SDK), knows none for `s3://`. Its default
//! log store commits a version by a put-if-absent (`If-None-Match: *`), which S3 honours, so it
//! is safe with concurrent writers and needs no lock table: registering it for `s3://` is all a
//! table on S3 needs. The object store itself comes from the output location
//! ([`crate::store::ObjectLocation::table`]).

use std::sync::{Arc, Once};

use deltalake::DeltaResult;
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
};
use url::Url;

struct ConditionalPutLogStores;

impl LogStoreFactory for ConditionalPutLogStores {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Registers the log store for `s3://` tables (once per process).
pub fn register() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        let scheme = Url::parse("s3://").expect("a valid URL");
        logstore_factories().insert(scheme, Arc::new(ConditionalPutLogStores));
    });
}
